"""benchmarks/model_speed.py, length_growth.py and the other benchmark scripts: the README's and
docs' tables come from their workers, so the workers' bookkeeping is checked on a tiny run."""

import math
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import checkpoint_every  # noqa: E402
import length_growth  # noqa: E402
import model_speed  # noqa: E402
import wait_policy  # noqa: E402


def test_model_speed_worker_reports_the_steady_state_apart_from_the_first_step():
    r = model_speed.worker("swa", 64, "fp32", steps=3)
    assert r["T"] == 64 and r["grad_finite"] is True
    assert r["seconds"] > 0 and math.isclose(r["tokens_per_s"], 64 / r["seconds"])
    assert r["first_step_seconds"] > 0
    assert r["first_step_page_faults"] >= 0 and r["later_step_page_faults"] >= 0


@pytest.mark.parametrize("variant", ["lmm", "transformer"])
def test_length_growth_ratio_is_the_per_round_long_over_short_per_token_time(variant):
    r = length_growth.worker(variant, 32, 96, rounds=2, dtype="fp32")
    assert len(r["ratios"]) == len(r["us_per_token_short"]) == len(r["us_per_token_long"]) == 2
    for ratio, s, lg in zip(r["ratios"], r["us_per_token_short"], r["us_per_token_long"]):
        assert s > 0 and lg > 0 and math.isclose(ratio, lg / s, rel_tol=1e-9)
    assert min(r["ratios"]) <= r["median_ratio"] <= max(r["ratios"]) and r["long_grad_finite"] is True


def test_length_growth_refuses_bad_arguments(monkeypatch, capsys):
    for argv, msg in ((["--variants", "mamba"], "unknown variant"),
                      (["--short", "64", "--long", "32"], "0 < --short"),
                      (["--rounds", "0"], "--rounds must be at least 1")):
        monkeypatch.setattr(sys, "argv", ["length_growth.py", *argv])
        with pytest.raises(SystemExit):
            length_growth.main()
        assert msg in capsys.readouterr().err


def test_long_stream_writes_its_rows_and_says_when_a_time_limit_stopped_it(tmp_path):
    """benchmarks/long_stream.py: every report row is saved as it comes; --max-minutes stops the run
    early with what it reached (the 10M-token stream is reported that way)."""
    import json
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "long_stream.py"
    base = [sys.executable, str(script), "--preset", "tiny", "--piece", "512", "--report", "1024",
            "--checkpoint", str(tmp_path / "stream.pt")]
    done = subprocess.run(base + ["--tokens", "2560", "--out", str(tmp_path / "all")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "all.json").read_text())
    assert [r["tokens"] for r in result["rows"]] == [1024, 2048, 2560] and result["stopped"] is None
    cut = subprocess.run(base + ["--tokens", "100000", "--max-minutes", "0.0001", "--out",
                                 str(tmp_path / "cut")], capture_output=True, text=True, timeout=300)
    assert cut.returncode == 0, cut.stderr[-2000:]
    result = json.loads((tmp_path / "cut.json").read_text())
    assert result["stopped"] == "--max-minutes 0.0001" and result["rows"][-1]["tokens"] == 1024
    assert "Stopped by --max-minutes" in (tmp_path / "cut.md").read_text()
    bad = subprocess.run(base + ["--tokens", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--tokens, --piece and --report must be >= 1" in bad.stderr


def test_long_stream_resumed_over_legs_ends_in_the_state_of_one_run(tmp_path):
    """--resume goes on from the checkpoint (model config, weights, stream state, generator) and
    ends exactly where an uninterrupted stream does."""
    import subprocess

    import torch

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "long_stream.py"
    base = [sys.executable, str(script), "--preset", "tiny", "--piece", "384", "--report", "768"]

    def stream(name: str, tokens: int, *extra: str) -> dict:
        ckpt = tmp_path / f"{name}.pt"
        done = subprocess.run(base + ["--tokens", str(tokens), "--out", str(tmp_path / name),
                                      "--checkpoint", str(ckpt), *extra], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return torch.load(ckpt, weights_only=False)

    whole = stream("whole", 2304)
    stream("legs", 768)
    legs = stream("legs", 2304, "--resume")
    assert legs["seen"] == whole["seen"] == 2304 and [r["leg"] for r in legs["rows"]] == [0, 1, 1]
    assert legs["config"] == whole["config"] and legs["config"]["variant"] == "mac"
    a, b = whole["state"].layers[0].memory.memory, legs["state"].layers[0].memory.memory
    assert a.position == b.position == 2304
    for wa, wb in zip(a.weights, b.weights):
        torch.testing.assert_close(wa, wb, rtol=0, atol=0)


def test_grad_paths_rows_are_training_rows_and_the_table_names_every_option(tmp_path, monkeypatch):
    """benchmarks/grad_paths.py: each row is T + 1 tokens of an S-NIAH-1 example in the training
    layout (separators, prompt, answer, separator); a run on a saved tiny MAC writes one finite norm
    per option, length and row."""
    import json

    import grad_paths
    import torch

    from titans.checkpoint import save_checkpoint
    from titans.data.tokenizer import ByteTokenizer
    from titans.model import TitansConfig, TitansLM

    tok = ByteTokenizer()
    x = grad_paths.row(tok, 200, 3)
    assert x.shape == (1, 201) and x[0, 0].item() == tok.eos_id and x[0, -1].item() == tok.eos_id
    assert "pass key" in tok.decode(x[0].tolist())
    torch.manual_seed(0)
    cfg = TitansConfig.from_preset("tiny", variant="mac", n_layers=1, dim=32, n_heads=2, segment_len=16,
                                   chunk_size=4, n_persistent=2, mlp_hidden=64)
    model = TitansLM(cfg)
    save_checkpoint(tmp_path / "run", 1, model_state=model.state_dict(), config=cfg, train_config={},
                    tokenizer=tok, trainer_state={}, tokens_seen=0)
    out = tmp_path / "paths"
    monkeypatch.setattr(sys, "argv", ["grad_paths.py", "--checkpoint", str(tmp_path / "run"), "--lengths",
                                      "128,160", "--rows", "2", "--out", str(out)])
    grad_paths.main()
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["options"] for r in result["results"]] == list(grad_paths.OPTIONS)
    for r in result["results"]:
        assert sorted(r["norms"]) == ["128", "160"]
        assert all(len(ns) == 2 and all(math.isfinite(n) and n > 0 for n in ns) for ns in r["norms"].values())
    assert "first_order + detach_write" in out.with_suffix(".md").read_text()
    # --options picks rows, and the table's command says which
    monkeypatch.setattr(sys, "argv", ["grad_paths.py", "--checkpoint", str(tmp_path / "run"), "--lengths",
                                      "128", "--rows", "1", "--out", str(out), "--options", "detach_kv"])
    grad_paths.main()
    picked = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [r["options"] for r in picked] == ["detach_kv"]
    assert "--options 'detach_kv'" in out.with_suffix(".md").read_text()
    monkeypatch.setattr(sys, "argv", ["grad_paths.py", "--checkpoint", str(tmp_path / "run"),
                                      "--options", "nope"])
    with pytest.raises(SystemExit):
        grad_paths.main()


def test_memory_ab_times_the_base_revision_and_the_working_tree_side_by_side(tmp_path):
    """benchmarks/memory_ab.py: the base side really runs the other revision's code (a worktree),
    the head side this tree's, and the ratio is head over base; a bad revision is refused."""
    import json
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse", "HEAD"], cwd=root,
                                                     capture_output=True).returncode != 0:
        pytest.skip("needs a git checkout")
    script = root / "benchmarks" / "memory_ab.py"
    # the eager loops on both sides: the worktree would otherwise build its own C++ extension (a minute)
    env = {**os.environ, "TITANS_NATIVE": "0"}
    done = subprocess.run([sys.executable, str(script), "--base", "HEAD", "--lengths", "64", "--repeats", "1",
                           "--steps", "2", "--out", str(tmp_path / "ab")], capture_output=True, text=True,
                          timeout=600, cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "ab.json").read_text())
    (row,) = result["rows"]
    assert row["T"] == 64
    assert Path(row["head"]["titans_file"]).resolve().is_relative_to(root / "titans")
    assert "memory_ab_" in row["base"]["titans_file"] and not Path(row["base"]["titans_file"]).exists()
    assert math.isclose(row["ratio_wall"], row["head"]["median_wall_s"] / row["base"]["median_wall_s"])
    assert "| 64 |" in (tmp_path / "ab.md").read_text()
    bad = subprocess.run([sys.executable, str(script), "--base", "no-such-revision"], capture_output=True,
                         text=True, timeout=120, cwd=root)
    assert bad.returncode != 0 and "is not a revision" in bad.stderr


def test_checkpoint_every_gives_the_same_gradients_for_every_stretch_length_and_restores_it():
    import titans.memory.chunked as chunked

    before = chunked.CHECKPOINT_EVERY
    r = checkpoint_every.run(T=200, values=[4, 1, 3], steps=2, dim=32, heads=2)  # 4 chunks, the last open
    assert chunked.CHECKPOINT_EVERY == before
    assert [row["checkpoint_every"] for row in r["rows"]] == [4, 1, 3]
    for row in r["rows"]:
        assert len(row["times_s"]) == 2 and row["median_s"] > 0 and row["max_rel_diff_vs_first"] < 1e-5
    assert "| 3 |" in checkpoint_every.table(r)
    with pytest.raises(ValueError, match="values >= 1"):
        checkpoint_every.run(T=64, values=[0], steps=1)


def test_wait_policy_workers_get_the_policy_and_threads_asked_for_and_the_table_divides_them(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the caller's own setting does not leak into "unset"
    unset = wait_policy.run_worker(T=64, steps=1, threads=1, policy=None)
    passive = wait_policy.run_worker(T=64, steps=1, threads=1, policy="PASSIVE")
    assert (unset["policy"], unset["threads"]) == (None, 1)
    assert (passive["policy"], passive["threads"]) == ("PASSIVE", 1) and passive["seconds"] > 0
    seconds = {"unset": 3.0, "PASSIVE": 1.5, "1 thread": 1}
    row = {"T": 64, "threads": 2, "other_process": True, "seconds": seconds}
    assert "| 64 | 2 | one busy process | 3.000 | 1.500 | 2.00x | 1.000 |" in wait_policy.table([row])


def test_memory_speed_counts_the_in_place_products_that_the_flop_counter_leaves_out():
    import memory_speed
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    c, a, b = torch.zeros(3, 4, 6), torch.randn(3, 4, 5), torch.randn(3, 5, 6)
    m, x, y = torch.zeros(4, 6), torch.randn(4, 5), torch.randn(5, 6)
    want = 2 * 3 * 4 * 5 * 6 + 2 * 4 * 5 * 6
    with FlopCounterMode(display=False) as plain:
        c.clone().baddbmm_(a, b), m.clone().addmm_(x, y)
    with FlopCounterMode(display=False, custom_mapping=memory_speed.in_place_products()) as counted:
        c.clone().baddbmm_(a, b), m.clone().addmm_(x, y)
    with FlopCounterMode(display=False) as functional:
        torch.baddbmm(c, a, b), torch.addmm(m, x, y)
    assert plain.get_total_flops() == 0  # what the counter alone misses
    assert counted.get_total_flops() == functional.get_total_flops() == want


def test_gemm_floor_replays_the_products_it_recorded_and_counts_their_flops():
    import gemm_floor

    counts = gemm_floor.record_products(*gemm_floor.warmed_up(128))
    names = {name for name, _ in counts}
    assert {"aten::bmm", "aten::baddbmm_"} <= names
    assert gemm_floor.product_flops("aten::bmm", ((8, 64, 96), (8, 96, 384))) == 2 * 8 * 64 * 96 * 384
    assert gemm_floor.product_flops("aten::addmm", ((6,), (4, 5), (5, 6))) == 2 * 4 * 5 * 6
    times = gemm_floor.replay(counts, rounds=2)
    assert len(times) == 2 and all(t > 0 for t in times)


def test_subnormal_gates_sets_the_momentum_gate_and_restores_the_flush():
    import subnormal_gates
    import torch
    from memory_speed import build

    from titans.memory import chunked

    module = subnormal_gates.with_eta(build("titans"), 0.2)
    x = torch.randn(2, 64, 384)
    with torch.no_grad():
        logits = torch.nn.functional.linear(x, module.gates.weight, module.gates.bias)
        gates = logits.view(2, 64, len(module.gate_names), -1)  # (n h l) on the last dim, n outermost
        eta = torch.sigmoid(gates[:, :, module.gate_names.index("eta")])
    assert torch.allclose(eta, torch.full_like(eta, 0.2), atol=0.02)
    flush = chunked._flush_subnormal
    times = subnormal_gates.time_steps(module, x.requires_grad_(), "no flush", 2)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert chunked._flush_subnormal is flush  # put back after the "no flush" steps


def test_native_ab_times_both_loops_and_splits_the_step():
    import native_ab

    from titans.memory import chunked, chunks_native, native

    if not chunks_native():
        pytest.skip("the C++ chunk loops did not build here")
    r = native_ab.ab(64, 2)
    assert {k: len(v) for k, v in r["seconds"].items()} == {"native": 2, "eager": 2}
    assert math.isclose(r["ratio"], r["median"]["native"] / r["median"]["eager"])
    module_before, forward_before = native._STATE["module"], chunked._MemoryChunks.forward
    rows = native_ab.split(128, 1)
    assert rows[0]["extension"] > 0 and rows[0]["memory_python"] > 0 and rows[0]["outside_memory"] > 0
    assert 0 < rows[0]["layer_cpp"] < rows[0]["outside_memory"]
    parts = sum(rows[0][k] for k in ("extension", "memory_python", "outside_memory"))
    assert math.isclose(parts, rows[0]["step"])
    assert native._STATE["module"] is module_before and chunked._MemoryChunks.forward is forward_before
    assert chunks_native()
