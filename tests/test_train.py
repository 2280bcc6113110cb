"""The trainer: config errors, schedule, decay groups, exact resume, signals, atomic checkpoints,
loading and sampling, clear CLI errors, and data parallelism on 2 CPU processes (gloo)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titans import TitansLM
from titans.checkpoint import find_checkpoint, list_checkpoints, load, open_checkpoint, save_checkpoint
from titans.cli import main as cli
from titans.errors import TitansError, TrainingDiverged
from titans.model import TitansConfig
from titans.train import (
    OptimConfig,
    forward_backward,
    load_config,
    lr_factor,
    make_optimizer,
    read_metrics,
    train,
)

ROOT = Path(__file__).resolve().parents[1]


def small_config(tmp_path, corpus_dir, **sets):
    """A very small MAC run on the fixture corpus: 2 layers, dim 32, windows of 32 tokens."""
    base = {"model.preset": "tiny", "model.variant": "mac", "model.dim": 32, "model.n_layers": 2,
            "model.n_heads": 2, "model.segment_len": 16, "model.window": 16, "model.n_persistent": 2,
            "model.mlp_hidden": 64,
            "data.dir": str(corpus_dir), "data.sources": "pypi", "data.seq_len": 32,
            "optim.warmup_steps": 2, "train.batch_size": 2, "train.steps": 6, "train.eval_every": 3,
            "train.eval_windows": 4, "train.ckpt_every": 3, "train.progress": False,
            "train.tensorboard": False, "train.out": str(tmp_path / "run")}
    base.update(sets)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def quiet(*args, **kwargs):
    pass


# ----------------------------------------------------------------------------- configuration

def test_unknown_keys_get_a_suggestion(tmp_path):
    with pytest.raises(TitansError, match=r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(None, ["optim.lrr=1e-3"])
    with pytest.raises(TitansError, match="did you mean 'model.variant'"):
        load_config(None, ["model.variannt=mag"])
    f = tmp_path / "c.yaml"
    f.write_text("optimm:\n  lr: 1\n")
    with pytest.raises(TitansError, match="unknown section 'optimm'.*did you mean 'optim'"):
        load_config(f)


def test_bad_values_are_named():
    with pytest.raises(TitansError, match="train.steps must be an int, got 'many'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(TitansError, match="train.batch_size must be > 0"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(TitansError, match="unknown variant 'magg'.*did you mean 'mag'"):
        load_config(None, ["model.variant=magg"])
    with pytest.raises(TitansError, match="not a preset"):
        load_config(None, ["model.preset=huge"])
    with pytest.raises(TitansError, match="key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(TitansError, match="train.bptt must be >= 0"):
        load_config(None, ["train.bptt=-1"])
    with pytest.raises(TitansError, match="train.max_minutes must be >= 0"):
        load_config(None, ["train.max_minutes=-1"])


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("model:\n  variant: mag\noptim:\n  lr: 1.0e-3\ntrain:\n  steps: 7\n")
    cfg = load_config(f, ["optim.lr=2e-3", "train.bf16=false"])
    assert cfg.model["variant"] == "mag" and cfg.optim.lr == 2e-3 and cfg.train.steps == 7
    assert cfg.train.bf16 is False and isinstance(cfg.optim.lr, float)
    assert cfg.train.out == "out/runs/exp"  # the run folder is named after the config
    with pytest.raises(TitansError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    for f in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(f)
        assert cfg.model_config(256).variant in f.stem


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg, 100) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b - 1e-12 for a, b in zip(f[10:], f[11:]))
    assert f[100] == pytest.approx(0.1) and f[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)


def test_weight_decay_skips_norms_biases_embeddings_and_persistent_tokens():
    from titans import TitansConfig

    model = TitansLM(TitansConfig.from_preset("tiny", variant="mac", dim=32, n_heads=2, n_layers=1))
    opt = make_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n: id(p) in decayed for n, p in model.named_parameters()}
    assert not names["embed.weight"] and not names["norm.weight"]
    assert not names["blocks.0.mixer.memory.gates.bias"]
    assert not names["blocks.0.mixer.attention.persistent_k"]
    assert not names["blocks.0.mixer.memory.ln_gamma"]
    assert names["blocks.0.mixer.memory.qkv.weight"] and names["head.weight"]
    assert names["blocks.0.mlp.up.weight"]
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert sum(map(len, (g["params"] for g in opt.param_groups))) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- training runs

def test_training_lowers_the_loss_and_writes_the_run_folder(tmp_path, corpus_dir):
    cfg = small_config(tmp_path, corpus_dir, **{"train.steps": 30, "train.eval_every": 15,
                                                "optim.lr": 1e-2, "train.tensorboard": True,
                                                "train.ckpt_every": 10, "train.keep_last": 2})
    s = train(cfg, log=quiet)
    run = Path(s["run_dir"])
    recs = read_metrics(run / "metrics.jsonl")
    train_losses = [r["loss"] for r in recs if "loss" in r]
    vals = [r["val_bpb"] for r in recs if "val_bpb" in r]
    assert len(train_losses) == 30 and len(vals) == 2
    assert sum(train_losses[-5:]) / 5 < sum(train_losses[:5]) / 5 - 0.5
    assert vals[1] < vals[0] and math.isfinite(s["val_bpb"])
    assert math.log2(256) * 0.5 < vals[0] < 9  # bytes: an untrained model is near 8 bits/byte
    for f in ("loss.png", "summary.json", "config.yaml"):
        assert (run / f).is_file()
    assert any((run / "tb").iterdir())
    assert [p.name for p in list_checkpoints(run)] == ["step_00000020", "step_00000030"]
    assert s["tokens"] == 30 * 2 * 32


def test_max_minutes_stops_with_a_checkpoint_and_resume_finishes(tmp_path, corpus_dir):
    cfg = small_config(tmp_path, corpus_dir, **{"train.max_minutes": 1e-9, "train.ckpt_every": 100})
    part = train(cfg, log=quiet)
    assert part["stopped_by"] == "max_minutes" and part["steps"] == 1  # the budget is spent after step 1
    assert Path(part["checkpoint"]).name == "step_00000001"
    assert math.isfinite(part["val_loss"])  # validated where the budget stopped it
    cfg.train.max_minutes = 0.0
    done = train(cfg, resume=True, log=quiet)
    assert done["steps"] == 6
    again = train(cfg, resume=True, log=quiet)  # already finished: reports its last numbers, not None
    assert again["steps"] == 6 and again["val_loss"] == done["val_loss"]
    assert again["val_bpb"] == done["val_bpb"] is not None
    assert again["checkpoint"] == done["checkpoint"] and again["stopped_by"] is None


def test_resume_after_sigterm_matches_an_uninterrupted_run_bit_for_bit(tmp_path, corpus_dir):
    full = train(small_config(tmp_path / "a", corpus_dir, **{"train.ckpt_every": 100}), log=quiet)

    def interrupt_at_step_3(msg):
        if msg.startswith("step 3/"):
            signal.raise_signal(signal.SIGTERM)  # as a cluster scheduler would

    cfg = small_config(tmp_path / "b", corpus_dir, **{"train.ckpt_every": 100, "train.log_every": 1})
    part = train(cfg, log=interrupt_at_step_3)
    assert part["stopped_by"] == "SIGTERM" and part["steps"] == 3
    assert Path(part["checkpoint"]).name == "step_00000003"
    resumed = train(cfg, resume=True, log=quiet)
    assert resumed["steps"] == 6
    a, b = losses(full["run_dir"]), losses(part["run_dir"])
    assert list(a) == list(b) == [1, 2, 3, 4, 5, 6]
    assert a == b  # exact float equality, every step
    assert resumed["val_loss"] == full["val_loss"]
    wa = load(full["run_dir"])[0].state_dict()
    wb = load(part["run_dir"])[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_to_the_cli_saves_and_exits_cleanly(tmp_path, corpus_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
model: {{preset: tiny, variant: transformer, dim: 32, n_layers: 1, n_heads: 2, mlp_hidden: 64}}
data: {{dir: {corpus_dir}, sources: pypi, seq_len: 32}}
train: {{steps: 100000, batch_size: 2, eval_every: 100000, ckpt_every: 100000, log_every: 1,
        progress: false, tensorboard: false, out: {tmp_path / 'run'}}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    p = subprocess.Popen([sys.executable, "-m", "titans", "train", "--config", str(cfg)], cwd=tmp_path,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # wait until training runs
        if line.startswith("step 2/"):
            break
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "Traceback" not in err
    assert "stopped by SIGTERM" in out and "--resume" in out
    ck = find_checkpoint(tmp_path / "run")
    assert open_checkpoint(ck).step >= 2


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, corpus_dir):
    """2 micro-steps of 2 sequences draw the same 4 windows as 1 step of 4 and average the same
    gradient: the losses agree up to float rounding at every step."""
    sets = {"train.steps": 4, "train.ckpt_every": 100}
    big = train(small_config(tmp_path / "big", corpus_dir, **sets, **{"train.batch_size": 4}), log=quiet)
    acc = train(small_config(tmp_path / "acc", corpus_dir, **sets,
                             **{"train.batch_size": 2, "train.grad_accum": 2}), log=quiet)
    assert big["tokens"] == acc["tokens"] == 4 * 4 * 32
    a, b = losses(big["run_dir"]), losses(acc["run_dir"])
    assert list(a) == list(b) == [1, 2, 3, 4] and a[4] != a[1]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), (s, a, b)


def _bptt_case():
    torch.manual_seed(0)
    cfg = TitansConfig.from_preset("tiny", variant="mac", dim=16, n_layers=2, n_heads=2, mlp_hidden=32,
                                   segment_len=8, chunk_size=4, n_persistent=2)
    model = TitansLM(cfg).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 30), generator=g)
    y = torch.randint(0, 256, (2, 30), generator=g)
    y[0, :7] = -100  # unscored targets (task rows score only their answers)
    return model, x, y


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_truncated_bptt_keeps_the_loss_and_cuts_the_gradient_between_pieces():
    """bptt = 0 or >= T is plain backprop; bptt = 12 gives the same loss (pieces on the state equal
    one call), and the gradient of an explicit reference: per piece, the loss on a detached state,
    backpropagated alone. With a memory that carries the stream, that differs from full backprop."""
    model, x, y = _bptt_case()
    logits, _ = model(x)
    ref_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    ref_loss.backward()
    full = _grads(model)
    for bptt in (0, 30, 64):
        assert forward_backward(model, x, y, bptt=bptt) == pytest.approx(ref_loss.item(), rel=1e-12)
        for n, gr in _grads(model).items():
            torch.testing.assert_close(gr, full[n], rtol=1e-12, atol=1e-14)

    loss = forward_backward(model, x, y, bptt=12, scale=0.5)
    assert loss == pytest.approx(ref_loss.item(), rel=1e-10)
    truncated = _grads(model)
    state, n_scored = None, (y != -100).sum()
    for a in (0, 12, 24):  # the reference: three pieces, each on the detached state of the last
        logits, state = model(x[:, a:a + 12], None if state is None else state.detach())
        piece = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, a:a + 12].flatten(),
                                                  ignore_index=-100, reduction="sum") / n_scored
        (0.5 * piece).backward()
    reference = _grads(model)
    for n, gr in truncated.items():
        torch.testing.assert_close(gr, reference[n], rtol=1e-10, atol=1e-14)
    differs = max(((truncated[n] - 0.5 * full[n]).norm() / full[n].norm()).item() for n in full)
    assert differs > 1e-3


def test_a_fresh_run_refuses_a_folder_with_earlier_checkpoints(trained, tmp_path):
    """Training anew into an old run folder would mix checkpoints, and pruning by step could delete
    the new run's last one (the demo hit this: an old step_240 outlived a new step_200)."""
    run = _copy_run(trained, tmp_path)
    cfg = small_config(tmp_path, Path("unused"), **{"train.out": str(run)})
    with pytest.raises(TitansError, match=r"already holds checkpoints of an earlier run \(latest step_0+3\); "
                                          r"continue it with --resume"):
        train(cfg, log=quiet)


def test_exploding_gradients_get_one_warning_with_the_remedy(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.setattr("titans.train.EXPLODING_GRAD_NORM", 0.0)
    lines = []
    train(small_config(tmp_path, corpus_dir, **{"train.steps": 3, "train.bptt": 16}), log=lines.append)
    warnings = [m for m in lines if "gradient norm" in m]
    assert len(warnings) == 1 and "train.bptt" in warnings[0]


def test_a_non_finite_gradient_stops_training_with_the_remedy(tmp_path, corpus_dir, monkeypatch):
    """The loss can stay finite while the gradient through a long memory chain overflows: clipping an
    inf norm would zero the update and a NaN one would poison the weights, so neither may pass."""
    import titans.train as tr

    real = tr.forward_backward

    def overflowing(net, *args, **kwargs):
        loss = real(net, *args, **kwargs)
        next(net.parameters()).grad.view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(tr, "forward_backward", overflowing)
    for clip in (1.0, 0.0):  # with and without gradient clipping
        cfg = small_config(tmp_path / str(clip), corpus_dir, **{"train.steps": 2, "optim.grad_clip": clip})
        with pytest.raises(TitansError, match=r"the gradient became (inf|nan) at step 0 .*train\.bptt") as e:
            train(cfg, log=quiet)
        # drivers (experiments/table5.py) record a divergence from these fields, not from the text
        assert isinstance(e.value, TrainingDiverged)
        assert (e.value.step, e.value.quantity) == (0, "gradient") and not math.isfinite(e.value.value)


def test_oversubscribed_cpu_threads_get_a_warning_that_names_the_fix(tmp_path, corpus_dir, monkeypatch):
    """Two threads next to a busy core crawl (benchmarks/results/wait_policy.md): the trainer says so
    at the start, with the OMP_NUM_THREADS that fits; with the cores free it says nothing."""
    import titans.device
    from titans.device import busy_cores, cpu_warning, oversubscription_hint
    from titans.evaluate import evaluate

    assert oversubscription_hint(1, 5.0, 2) is None and oversubscription_hint(2, None, 2) is None
    assert oversubscription_hint(2, 0.2, 2) is None and oversubscription_hint(4, 2.0, 8) is None
    assert "OMP_NUM_THREADS=1" in oversubscription_hint(2, 1.0, 2)
    assert "OMP_NUM_THREADS=6" in oversubscription_hint(8, 2.1, 8)
    with pytest.raises(ValueError, match="at least 1"):
        oversubscription_hint(0, 1.0, 2)
    busy = busy_cores(0.05)
    assert busy is None or -1e-9 <= busy <= os.cpu_count() + 1e-9
    with pytest.raises(ValueError, match="positive"):
        busy_cores(0)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cpu_warning(torch.device("meta")) is None  # not a CPU: nothing measured
        for others, warned in ((1.0, True), (0.0, False)):
            monkeypatch.setattr(titans.device, "busy_cores", lambda others=others: others)
            monkeypatch.setattr(titans.device, "usable_cores", lambda: 2)
            lines = []
            train(small_config(tmp_path / str(others), corpus_dir, **{"train.steps": 1}), log=lines.append)
            hits = [line for line in lines if line.startswith("warning: other processes keep")]
            assert bool(hits) == warned, lines
            assert not hits or "1.0 of 2 CPU cores busy and this one runs 2 threads" in hits[0]
            # the evaluation says the same before it starts
            lines = []
            evaluate(tmp_path / str(others) / "run", ["ppl"], [], data_dir=corpus_dir, n_examples=1,
                     max_tokens=64, out_dir=tmp_path / f"eval{others}", log=lines.append)
            assert any(line.startswith("warning: other processes keep") for line in lines) == warned
        torch.set_num_threads(1)
        assert cpu_warning(torch.device("cpu")) is None  # one thread: nothing to warn about
    finally:
        torch.set_num_threads(threads)


def test_cuda_graphs_on_the_cpu_is_a_clear_error(tmp_path, corpus_dir, monkeypatch):
    """train.cuda_graphs captures the memory's chunk loops as CUDA graphs: on the CPU it names the fix
    and leaves the process-wide switch off."""
    from titans.memory import chunks_graphed

    cfg = small_config(tmp_path, corpus_dir, **{"train.cuda_graphs": "true", "train.device": "cpu"})
    with pytest.raises(TitansError, match=r"train.cuda_graphs=true needs a CUDA device, got cpu"):
        train(cfg, log=quiet)
    assert not chunks_graphed()
    # under torchrun (several processes) it is refused before anything is built
    import titans.train as tr
    from titans.distributed import World

    monkeypatch.setattr(tr.distributed, "setup", lambda device: World(0, 2, 0))
    monkeypatch.setattr(tr.distributed, "teardown", lambda finished: None)
    with pytest.raises(TitansError, match=r"runs on one process only, got 2: drop it under torchrun"):
        train(cfg, log=quiet)
    assert not chunks_graphed()


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir):
    tmp = tmp_path_factory.mktemp("trained")
    s = train(small_config(tmp, corpus_dir, **{"train.steps": 3, "train.ckpt_every": 3}), log=quiet)
    return Path(s["run_dir"])


def _copy_run(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def test_interrupted_checkpoint_write_keeps_the_previous_one(trained, tmp_path, monkeypatch):
    run = _copy_run(trained, tmp_path)
    before = find_checkpoint(run)
    ck = open_checkpoint(before)
    model, tok = load(run)

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("titans.checkpoint.torch.save", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(run, 4, model_state=model.state_dict(), config=ck.config, train_config={},
                        tokenizer=tok, trainer_state={}, tokens_seen=0)
    assert find_checkpoint(run) == before
    assert not (run / "checkpoints" / "step_00000004").exists()
    assert not list((run / "checkpoints").glob(".tmp-*"))
    # a writer killed outright leaves a hidden temporary folder: ignored, then cleaned up
    stale = run / "checkpoints" / ".tmp-step_00000009-1"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert find_checkpoint(run) == before
    load(run)
    monkeypatch.undo()
    new = save_checkpoint(run, 5, model_state=model.state_dict(), config=ck.config, train_config={},
                          tokenizer=tok, trainer_state={}, tokens_seen=0, keep_last=1)
    assert find_checkpoint(run) == new and not stale.exists()
    assert list_checkpoints(run) == [new]


def test_load_gives_the_trained_model_and_its_tokenizer(trained):
    import titans

    model, tok = titans.load(trained)
    assert isinstance(model, TitansLM) and not model.training
    ids = tok.encode("To be, or not")
    assert tok.decode(ids) == "To be, or not"
    logits, _ = model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()


def test_corrupt_checkpoint_is_a_clear_error(trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path)
    f = find_checkpoint(run) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(TitansError, match="corrupt"):
        load(run)
    assert cli(["sample", "--checkpoint", str(run), "--prompt", "a"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0] and "model.safetensors" in err[0]
    (find_checkpoint(run) / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(TitansError, match="trainer.pt is corrupt"):
        open_checkpoint(run).trainer_state()


def test_weights_only_checkpoint_loads_and_fine_tunes_but_does_not_resume(trained, tmp_path, corpus_dir):
    run = _copy_run(trained, tmp_path)
    (find_checkpoint(run) / "trainer.pt").unlink()
    model, _ = load(run)
    reference, _ = load(trained)
    ref = reference.state_dict()
    assert all(torch.equal(w, ref[k]) for k, w in model.state_dict().items())
    with pytest.raises(TitansError, match="no trainer.pt .*weights-only.*not resumed"):
        open_checkpoint(run).trainer_state()
    cfg = small_config(tmp_path / "ft", corpus_dir, **{"train.steps": 2, "train.init_from": str(run)})
    assert train(cfg, log=quiet)["steps"] == 2


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert cli(["sample", "--checkpoint", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    (tmp_path / "empty_run").mkdir()
    assert cli(["sample", "--checkpoint", str(tmp_path / "empty_run")]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_resume_with_another_tokenizer_is_refused(trained, tmp_path, corpus_dir):
    run = _copy_run(trained, tmp_path)
    cfg = small_config(tmp_path, corpus_dir, **{"train.out": str(run), "data.tokenizer": "bpe600",
                                                "train.steps": 4})
    with pytest.raises(TitansError, match="tokenizer"):
        train(cfg, resume=True, log=quiet)


def test_swapped_tokenizer_folder_is_detected(trained, tmp_path):
    from titans.data.tokenizer import train_bpe

    run = _copy_run(trained, tmp_path)
    tok_dir = find_checkpoint(run) / "tokenizer"
    shutil.rmtree(tok_dir)
    train_bpe(["some other text entirely, with words of its own. " * 200], 512, log=quiet).save(tok_dir)
    with pytest.raises(TitansError, match="does not match"):
        load(run)


def test_sample_cli_continues_the_prompt(trained, capsys):
    assert cli(["sample", "--checkpoint", str(trained), "--prompt", "HAMLET.", "--max-new-tokens", "12",
                "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("HAMLET.") and len(out.encode()) >= len("HAMLET.") + 1


def test_too_small_corpus_and_bad_config_are_one_line_cli_errors(tmp_path, corpus_dir, capsys):
    args = ["train", "--set", f"data.dir={corpus_dir}", "--set", "data.sources=pypi",
            "--set", "data.seq_len=100000000", "--set", f"train.out={tmp_path / 'r'}"]
    assert cli(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewer than seq_len" in err[0]
    assert cli(["train", "--set", "optim.lrr=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'optim.lr'" in err[0]


# ----------------------------------------------------------------------------- data parallel

def _torchrun(tmp_path, corpus_dir, nproc, batch, extra=()):
    out = tmp_path / f"run{nproc}"
    sets = [f"data.dir={corpus_dir}", "data.sources=pypi", "data.seq_len=32", "model.dim=32",
            "model.n_layers=2", "model.n_heads=2", "model.segment_len=16", "model.window=16",
            "model.n_persistent=2", "model.mlp_hidden=64", f"train.batch_size={batch}", "train.steps=4",
            "train.eval_every=4", "train.eval_windows=4", "train.ckpt_every=4", "train.progress=false",
            "train.tensorboard=false", f"train.out={out}", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "titans.train"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    for attempt in range(2):
        shutil.rmtree(out, ignore_errors=True)
        # its own session, so that a hung run is killed with its worker processes
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=150)  # a run takes about 7 s here, 20 s under load
            hung = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            hung = True
        # Known, rare gloo faults at process exit (about 1 in 10 under load for the first; the second
        # seen once in CI): a worker aborts with "terminate called without an active exception" (a
        # joinable C++ thread destroyed), or hangs after training finished. Retried once; any other
        # failure fails.
        known = hung or "terminate called without an active exception" in stderr
        if (proc.returncode == 0 and not hung) or attempt or not known:
            break
    assert not hung, f"hung for 150 s; stdout: {stdout[-2000:]}\nstderr: {stderr[-2000:]}"
    assert proc.returncode == 0, stderr[-3000:]
    return out


def test_teardown_waits_for_the_others_after_a_finished_run_and_destroys_nothing_after_an_error(
        tmp_path, monkeypatch):
    import torch.distributed as dist

    from titans import distributed

    barriers = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: barriers.append(1))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        distributed.teardown(finished=False)  # after an error: the group stays (others may be blocked)
        assert dist.is_initialized() and not barriers
        distributed.teardown(finished=True)
        assert not dist.is_initialized() and barriers == [1]
        distributed.teardown()  # nothing to leave: a no-op
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, corpus_dir, mode):
    extra = ["train.fsdp=true"] if mode == "fsdp" else []
    one = losses(_torchrun(tmp_path, corpus_dir, 1, 4))
    two_dir = _torchrun(tmp_path, corpus_dir, 2, 2, extra)
    two = losses(two_dir)
    assert list(one) == list(two) == [1, 2, 3, 4]
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=1e-5, abs=1e-6), (s, one, two)
    assert one[4] != one[1]  # the model did train
    # the 2-process run wrote one loadable checkpoint (rank 0 only)
    model, _ = load(two_dir)
    assert open_checkpoint(two_dir).step == 4
    summary = json.loads((two_dir / "summary.json").read_text())
    assert summary["tokens"] == 4 * 2 * 2 * 32


# ----------------------------------------------------------------------------- task fine-tuning

def test_task_mix_rows_score_only_the_answer_and_split_like_the_global_batch(corpus_dir):
    from titans.data.corpus import load_documents
    from titans.data.stream import TaskMix
    from titans.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    hay = "\n\n".join(d.text for d in load_documents(corpus_dir, "train"))
    mix = TaskMix(["niah_single_1", "niah_single_2"], hay, tok, 300, 0.5)
    x = torch.zeros(4, 300, dtype=torch.long)
    y = torch.zeros(4, 300, dtype=torch.long)
    gx, gy = mix.apply(x, y, seed=0, step=3)
    swapped = [i for i in range(4) if not torch.equal(gx[i], x[i])]
    assert swapped and len(swapped) < 4  # about half the rows, for this seed
    for i in swapped:
        scored = gy[i] != -100
        assert gy[i][-1] == tok.eos_id  # the answer ends with the separator: the model learns to stop
        answer = tok.decode(gy[i][scored][:-1].tolist())
        assert answer.strip().isdigit() and 5 <= len(answer.strip()) <= 7
        assert scored[-1] and scored.sum() == len(answer) + 1  # only the answer and its end, at the end
        prompt = tok.decode([t for t in gx[i].tolist() if t != tok.eos_id])
        assert answer.strip() in prompt.split("Answer:")[0]  # the needle is in the context
        assert torch.equal(gx[i][1:], gy[i][:-1].where(gy[i][:-1] != -100, gx[i][1:]))
    # the same global batch split over 2 ranks or 2 micro-steps
    halves = [mix.apply(x[:2], y[:2], seed=0, step=3, rank=r, world=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), gx)
    micro = [mix.apply(x[:2], y[:2], seed=0, step=3, micro=m, accum=2)[0] for m in range(2)]
    assert torch.equal(torch.cat(micro), gx)
    # varied lengths: prompts of many lengths within [shortest, seq_len - 16], each still a whole example
    varied = TaskMix(["niah_single_1", "niah_single_2"], hay, tok, 300, 1.0, lengths="varied")
    assert all(300 // 2 <= lo < 300 - 16 for lo in varied.shortest)
    prompts = []
    for seed in range(40):
        vx, vy = varied.example(seed)
        assert vy[-1] == tok.eos_id and (vy != -100).sum() >= 6
        n = int((vx != tok.eos_id).sum()) + 1 - int((vy != -100).sum())  # prompt tokens (x drops the last)
        assert min(varied.shortest) - 20 <= n <= 300 - 16, n  # make_niah may come in below the length asked
        prompts.append(n)
    assert max(prompts) - min(prompts) > 60, prompts
    assert torch.equal(mix.example(5)[0], TaskMix(["niah_single_1", "niah_single_2"], hay, tok, 300, 0.5,
                                                   lengths="fixed").example(5)[0])
    # place "random": the same examples, the padding split before and after them; only the answer and
    # its separator are scored, wherever they fall
    placed = TaskMix(["niah_single_1", "niah_single_2"], hay, tok, 300, 1.0, lengths="varied", place="random")
    ends = []
    for seed in range(40):
        px, py = placed.example(seed)
        vx, vy = varied.example(seed)
        scored = (py != -100).nonzero().flatten()
        assert torch.equal(py[scored], vy[vy != -100])  # the same answer, its separator last
        assert int(scored[-1]) - int(scored[0]) + 1 == len(scored)  # one run of tokens
        assert torch.equal(px[px != tok.eos_id], vx[vx != tok.eos_id])  # the same example's tokens
        assert torch.equal(px[1:], py[:-1].where(py[:-1] != -100, px[1:]))
        ends.append(int(scored[-1]))
    assert max(ends) - min(ends) > 60 and ends.count(299) < 10, ends  # not always at the row's end
    with pytest.raises(TitansError, match="task_place must be 'end' or 'random'"):
        TaskMix(["niah_single_1"], hay, tok, 300, 0.5, place="middle")
    with pytest.raises(TitansError, match="task_lengths must be 'fixed' or 'varied'"):
        TaskMix(["niah_single_1"], hay, tok, 300, 0.5, lengths="random")
    with pytest.raises(TitansError, match="unknown task"):
        TaskMix(["niah_single_9"], hay, tok, 300, 0.5)
    # a task that cannot fit the training length is refused up front, naming the task and seq_len
    with pytest.raises(TitansError, match="niah_single_2 does not fit data.seq_len = 64 .*too short"):
        TaskMix(["niah_single_2"], hay, tok, 64, 0.5)


def test_training_on_tasks_runs(tmp_path, corpus_dir):
    sets = {"data.seq_len": 256, "data.tasks": "niah_single_1", "data.task_mix": 1.0, "train.steps": 2,
            "train.eval_every": 2}
    cfg = small_config(tmp_path, corpus_dir, **sets)
    s = train(cfg, log=quiet)
    assert s["steps"] == 2 and math.isfinite(s["val_loss"])
    assert all(math.isfinite(v) for v in losses(s["run_dir"]).values())


def test_init_from_starts_from_the_weights_not_the_optimizer(trained, tmp_path, corpus_dir):
    from titans.checkpoint import load

    cfg = small_config(tmp_path, corpus_dir, **{"train.init_from": str(trained), "train.steps": 1,
                                                "optim.lr": 1e-12, "optim.warmup_steps": 0})
    s = train(cfg, log=quiet)
    base, new = load(trained)[0].state_dict(), load(s["run_dir"])[0].state_dict()
    assert all(torch.allclose(base[k], new[k], atol=1e-6) for k in base)  # lr ~0: weights carried over
    assert s["steps"] == 1  # the step count starts afresh
    bad = small_config(tmp_path / "b", corpus_dir, **{"train.init_from": str(trained), "model.dim": 64})
    with pytest.raises(TitansError, match="init_from.*differs"):
        train(bad, log=quiet)


def test_init_from_may_change_a_gradient_only_field(trained, tmp_path, corpus_dir):
    """model.first_order changes only the backward pass: a fine-tune may switch it on; the weights
    carry over and the new run records it."""
    from titans.checkpoint import load, open_checkpoint

    cfg = small_config(tmp_path, corpus_dir, **{"train.init_from": str(trained), "train.steps": 1,
                                                "optim.lr": 1e-12, "optim.warmup_steps": 0,
                                                "model.first_order": True, "model.forget_scale": 0.5})
    s = train(cfg, log=quiet)
    assert open_checkpoint(s["run_dir"]).config.first_order is True
    assert open_checkpoint(s["run_dir"]).config.forget_scale == 0.5  # changes no parameter either
    assert open_checkpoint(trained).config.first_order is False
    base, new = load(trained)[0].state_dict(), load(s["run_dir"])[0].state_dict()
    assert all(torch.allclose(base[k], new[k], atol=1e-6) for k in base)
