"""The prepared GPU script runs its code paths on the CPU (--quick), so a session that is lent a GPU
does not spend its minutes on a broken script."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_checks_quick_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    cmd = [sys.executable, str(ROOT / "benchmarks/gpu_checks.py"), "--device", "cpu", "--quick",
           "--skip", "memory", "--graphs", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    checks = [r["check"] for r in result["rows"]]
    assert sum(c.startswith("memory L=") for c in checks) == 6
    # --graphs: the graph switch is on in parts 2 and 4 (a no-op on the CPU) and the rows say so
    assert sum(c.endswith("causal / streaming (graphs)") for c in checks) == 8
    assert sum(c.startswith("model speed") and c.endswith("(graphs)") for c in checks) == 16
    assert all(r["grad_finite"] is True for r in result["rows"] if r["check"].startswith("model speed"))
    assert all(r["ok"] for r in result["rows"])
    assert "**numerics**" in out.with_suffix(".md").read_text()


def test_gpu_checks_model_speed_takes_lengths_and_variants(tmp_path):
    """The 'long' plan of benchmarks/gpu_session.sh asks for some variants at one length."""
    out = tmp_path / "long"
    cmd = [sys.executable, str(ROOT / "benchmarks/gpu_checks.py"), "--device", "cpu", "--quick", "--skip",
           "numerics,models,memory", "--variants", "lmm,swa", "--lengths", "96", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    checks = [r["check"] for r in json.loads(out.with_suffix(".json").read_text())["rows"]]
    assert checks == ["model speed tiny lmm T=96", "model speed tiny swa T=96"]
    bad = subprocess.run(cmd[:-4] + ["--lengths", "1k"], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert bad.returncode == 2 and "expected comma-separated integers" in bad.stderr
