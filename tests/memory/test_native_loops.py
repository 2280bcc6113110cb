"""The memory's CPU chunk loops in C++ (titans.memory.native): when they run, when the eager loops
run instead, and what happens where they cannot be built. Their numbers are checked against the
token loop in float64 by the suites that take the `loops` fixture (test_chunked_vs_reference,
test_streaming, test_layer), once with each implementation."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from memory_testlib import make_inputs, require_native, run

from titans.memory import chunked, native


@pytest.fixture
def calls(monkeypatch):
    """Counts of the extension's chunk-loop entry points (forward, backward), with the real extension
    behind them and behind its other entry points (the coefficients, the convolution)."""
    require_native()
    ext, counts = native.module(), {"forward": 0, "backward": 0}

    class Spy:
        def forward_stretch(self, *args):
            counts["forward"] += 1
            return ext.forward_stretch(*args)

        def backward_stretch(self, *args):
            counts["backward"] += 1
            return ext.backward_stretch(*args)

        def __getattr__(self, name):
            return getattr(ext, name)

    monkeypatch.setitem(native._STATE, "module", Spy())
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_runs_go_through_the_native_loops(calls, dtype):
    inp = make_inputs(2, 2, 40, 5, 2, seed=1, dtype=dtype).leaves()
    y, _ = run("chunked", inp, 4)
    y.square().sum().backward()
    # 10 chunks: one forward and one backward call per stretch of CHECKPOINT_EVERY chunks
    stretches = -(-10 // chunked.CHECKPOINT_EVERY)
    assert calls == {"forward": stretches, "backward": stretches}


@pytest.mark.parametrize("option", [{"grad_clip": 0.5}, {"forget_to": "init"}])
def test_options_the_native_loops_do_not_cover_run_eagerly(calls, option):
    inp = make_inputs(2, 2, 20, 5, 2, seed=2).leaves()
    y, _ = run("chunked", inp, 4, **option)
    y.square().sum().backward()
    assert calls == {"forward": 0, "backward": 0}


def test_a_failed_build_warns_once_and_the_eager_loops_run(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'titans_chunk_loops': c++: command not found")

    monkeypatch.setattr(native, "_STATE", {"enabled": True, "module": None, "error": None})
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    inp = make_inputs(2, 2, 12, 5, 2, seed=3)
    with pytest.warns(RuntimeWarning, match="did not build.*command not found.*eager PyTorch loops"):
        y, _ = run("chunked", inp, 4)
    assert not native.chunks_native()
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        y_again, _ = run("chunked", inp, 4)
    assert not [w for w in later if "did not build" in str(w.message)]  # warned once, not per call
    y_ref, _ = run("recurrent", inp, 4)
    assert torch.allclose(y, y_ref, rtol=1e-9, atol=1e-12) and torch.equal(y, y_again)


def test_titans_native_0_in_the_environment_turns_the_native_loops_off():
    code = "from titans.memory import native; print(native.chunks_native())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TITANS_NATIVE": "0"})
    assert out.stdout.strip() == "False"


def test_a_dispatch_mode_sees_the_eager_loops(calls):
    """FlopCounterMode (the benchmark's FLOP count) would miss the products the C++ loops run on
    worker threads: under any Python dispatch mode the eager loops run."""
    from torch.utils.flop_counter import FlopCounterMode

    inp = make_inputs(2, 2, 16, 5, 2, seed=4).leaves()
    with FlopCounterMode(display=False) as counter:
        y, _ = run("chunked", inp, 4)
        y.square().sum().backward()
    assert calls == {"forward": 0, "backward": 0} and counter.get_total_flops() > 0
