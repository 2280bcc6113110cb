"""The main job (`titans demo`) end to end on the fixture corpus, with a handful of steps."""

import math

from titans.cli import main as cli
from titans.demo import run_demo


def test_demo_trains_both_models_and_writes_the_report(tmp_path, corpus_dir):
    r = run_demo(tmp_path / "demo", data_dir=corpus_dir, steps=2, log=lambda *a: None)
    assert set(r["runs"]) == {"mac", "transformer"}
    mac, tf = r["runs"]["mac"], r["runs"]["transformer"]
    assert mac["tokens"] == tf["tokens"] == 2 * 8 * 256  # the same token budget
    assert abs(mac["parameters"] - tf["parameters"]) < 0.05 * tf["parameters"]  # the same size
    report = (tmp_path / "demo" / "report.md").read_text()
    for run in (mac, tf):
        assert math.isfinite(run["val_bpb"]) and f"{run['val_bpb']:.3f}" in report
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 10_000
    assert r["samples"]["mac"].startswith("ROMEO.\n") and "Sample from mac" in report


def test_demo_cli_rejects_bad_steps(capsys):
    assert cli(["demo", "--steps", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "steps must be >= 1" in err[0]
