"""benchmarks/sensitivity.py and benchmarks/forgetting_probe.py: the README's stability tables rest
on them, so their recurrences are checked against the library's float64 reference."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import forgetting_probe  # noqa: E402
import sensitivity  # noqa: E402

from titans.memory import memory_recurrent  # noqa: E402
from titans.memory.functional import LN_EPS  # noqa: E402


def test_probe_zero_rule_is_the_papers_recurrence():
    """The probe's 'zero' rule == memory_recurrent (chunk 1) on the same captured inputs; the
    'init' rule differs from it (it is another recurrence) and equals it when alpha = 0."""
    c = forgetting_probe.capture(48)
    y_ref, _ = memory_recurrent(c["q"], c["k"], c["v"], c["alpha"], c["eta"], c["theta"], c["weights"],
                                chunk_size=1, ln=c["ln"])
    y, norms = forgetting_probe.token_loop(c, "zero", c["k"][0])
    assert torch.allclose(y, y_ref[0], rtol=1e-10, atol=1e-12) and len(norms) == 2
    y_init, _ = forgetting_probe.token_loop(c, "init", c["k"][0])
    assert (y_init - y_ref[0]).abs().max() > 1e-6
    c0 = {**c, "alpha": torch.zeros_like(c["alpha"])}
    assert torch.allclose(forgetting_probe.token_loop(c0, "init", c["k"][0])[0],
                          forgetting_probe.token_loop(c0, "zero", c["k"][0])[0], rtol=1e-12, atol=1e-14)


def test_sensitivity_of_the_linear_memory_stays_at_float32_rounding():
    r = sensitivity.measure("depth1", 512, 256)
    assert len(r["rounding"]) == len(r["amplification"]) == 2 and len(r["final_weight_norms"]) == 1
    assert max(r["rounding"]) < 1e-5  # float32 vs float64: rounding only
    assert all(0 <= a < 10 for a in r["amplification"])
    eps = sensitivity.measure("ln_eps_1", 256, 256)["ln_eps"]
    assert eps == 1.0
    from titans.memory import functional

    assert functional.LN_EPS == LN_EPS  # restored after the scan
