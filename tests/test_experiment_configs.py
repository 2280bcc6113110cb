"""The experiment drivers. experiments/table2.py builds its fine-tune configs from the Table-1
runs: `--set` must reach the model config (a fine-tune from runs trained with forget_to=init needs
the same option, or train.init_from refuses the checkpoint), and a bad key must say so. A run that
a signal cut short must not be recorded as a result."""

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import answer_prior  # noqa: E402
import table2  # noqa: E402

from titans.errors import TitansError  # noqa: E402


def _save(path: Path, model) -> str:
    """A weights-only checkpoint of `model` (byte tokenizer) at `path`; its path as a string."""
    from titans.checkpoint import save_checkpoint
    from titans.data.tokenizer import ByteTokenizer

    save_checkpoint(path, 1, model_state=model.state_dict(), config=model.config, train_config={},
                    tokenizer=ByteTokenizer(), trainer_state={}, tokens_seen=0)
    return str(path)


def _args(**kw):
    base = dict(data="data", seq_len=256, suite="babilong", lr=1e-3, steps=10, batch_size=2, bptt=0,
                max_minutes=0.0, device="cpu", compile=False, cuda_graphs=False, table1_runs="out/t1",
                overrides=[], task_mix=1.0)
    return SimpleNamespace(**{**base, **kw})


def test_table2_set_reaches_the_model_config(tmp_path):
    plain = table2.config("mac", 0, _args(), tmp_path)
    assert plain.model.get("forget_to", "zero") == "zero"
    cfg = table2.config("mac", 1, _args(overrides=["model.forget_to=init", "optim.lr=3e-4"]), tmp_path)
    assert cfg.model["forget_to"] == "init" and cfg.optim.lr == 3e-4
    assert cfg.train.init_from.endswith("mac-s1") and "babilong_qa5" in cfg.data.tasks
    assert cfg.model_config(256).forget_to == "init"
    mixed = table2.config("mac", 0, _args(task_mix=0.5), tmp_path)
    assert plain.data.task_mix == 1.0 and mixed.data.task_mix == 0.5
    graphed = table2.config("mac", 0, _args(cuda_graphs=True), tmp_path)
    assert graphed.train.cuda_graphs and not plain.train.cuda_graphs


@pytest.mark.parametrize("bad, says", [("model.forget_to", "key=value"), ("optim.lrr=1", "optim.lrr")])
def test_table2_bad_set_names_the_problem(tmp_path, bad, says):
    with pytest.raises(TitansError, match=says):
        table2.config("mac", 0, _args(overrides=[bad]), tmp_path)


def test_a_signalled_run_is_not_recorded_as_finished():
    """The drivers (table1/2/5) call stop_if_interrupted after each train(): a run that SIGTERM cut
    short must stop the driver instead of being evaluated and written as a result."""
    from titans.train import stop_if_interrupted

    base = {"steps": 120, "checkpoint": "out/x/checkpoints/step_00000120"}
    for sig in ("SIGINT", "SIGTERM"):
        with pytest.raises(SystemExit, match=f"mac-s1: stopped by {sig} at step 120.*not recorded"):
            stop_if_interrupted({**base, "stopped_by": sig}, "mac-s1")
    stop_if_interrupted({**base, "stopped_by": None}, "mac-s1")  # finished
    stop_if_interrupted({**base, "stopped_by": "max_minutes"}, "mac-s1")  # a time-boxed run is a result
    for script in ("table1.py", "table2.py", "table5.py"):
        text = (Path(__file__).resolve().parents[1] / "experiments" / script).read_text()
        assert text.count("stop_if_interrupted(") == 1, script


def test_fit_stats_read_the_whole_history(tmp_path):
    """table2.fit_stats: a resumed run's metrics repeat steps; the last record of a step counts,
    validation records are skipped."""
    import json

    recs = [{"step": s, "tokens": 10 * s, "loss": float(s), "grad_norm": 1.0, "tok_per_s": 5.0}
            for s in range(1, 5)]
    recs += [{"step": 3, "tokens": 30, "loss": 30.0, "grad_norm": 9.0, "tok_per_s": 6.0},  # resumed at 2
             {"step": 4, "tokens": 40, "val_loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    got = table2.fit_stats(tmp_path, last=2)
    assert got["steps"] == 4 and got["tokens"] == 40 and got["max_grad_norm"] == 9.0
    assert got["loss_first_2"] == 1.5 and got["loss_last_2"] == (30.0 + 4.0) / 2


def test_answer_prior_of_the_room_tasks_is_uniform_over_six_rooms():
    """QA1-QA4 answer with one of 6 rooms, drawn about uniformly: entropy near ln 6, " <room>" is
    1 + 6.83 bytes on average; the mix floor lies between the QA5-only and room-only values."""
    out = answer_prior.answer_prior(600)
    for r in out["rows"][:4]:
        assert r["answers"] == 6 and abs(r["entropy_nats"] - math.log(6)) < 0.02
        assert 7.5 < r["answer_tokens"] < 8.2 and r["majority_accuracy"] < 0.25
    room = out["rows"][0]["entropy_nats"] / out["rows"][0]["answer_tokens"]
    qa5 = out["rows"][4]["entropy_nats"] / out["rows"][4]["answer_tokens"]
    assert min(room, qa5) < out["mix_loss_per_answer_token"] < max(room, qa5)


def test_passkey_probe_scores_the_answer_in_both_layouts(tmp_path, monkeypatch):
    """experiments/passkey_probe.py on a saved tiny model: the numbers lie in their ranges, the floor
    is 5 ln 10 per example spread over the answer's tokens, and --pad-to changes what is read."""
    import passkey_probe
    import torch

    from titans import TitansConfig, TitansLM
    from titans.data.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant="transformer", dim=32, n_layers=1, n_heads=2,
                                              mlp_hidden=64, init_std=0.3))  # far from uniform
    _save(tmp_path / "run", model)
    plain = passkey_probe.probe(str(tmp_path / "run"), 112, 3)
    padded = passkey_probe.probe(str(tmp_path / "run"), 112, 3, pad_to=129)
    for r in (plain, padded):
        assert 0 <= r["digit_accuracy_teacher_forced"] <= 1 and r["answer_loss_nats_per_token"] > 0
        assert 0 < r["key_influence"] < 1  # a random model: the key moves its prediction, a little
        # five digits per key, each position scored once per example: the positions average to the whole
        assert len(r["digit_accuracy_by_position"]) == 5
        assert sum(r["digit_accuracy_by_position"]) / 5 == pytest.approx(r["digit_accuracy_teacher_forced"])
    assert plain["format_floor_nats_per_token"] == pytest.approx(5 * math.log(10) / 6)  # " ddddd"
    assert padded["format_floor_nats_per_token"] == pytest.approx(5 * math.log(10) / 7)  # + separator
    assert padded["answer_loss_nats_per_token"] != pytest.approx(plain["answer_loss_nats_per_token"])
    # the prompt's loss, recomputed here from a forward pass on each bare prompt (needles drawn, and
    # all at depth 0: the depth reaches the examples)
    from titans.tasks.niah import make_niah

    def prompt_loss(examples, depth):
        nats, count = 0.0, 0
        with torch.no_grad():
            for i in range(examples):
                ids = torch.tensor([ByteTokenizer().encode(make_niah("single_1", 112, depth, seed=i).prompt)])
                logits = model(ids)[0][0, :-1]
                nats += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                count += ids.shape[1] - 1
        return nats / count

    drawn3, drawn2, shallow2 = prompt_loss(3, None), prompt_loss(2, None), prompt_loss(2, 0.0)
    assert plain["prompt_loss_nats_per_token"] == pytest.approx(drawn3, rel=1e-5)
    shallow = passkey_probe.probe(str(tmp_path / "run"), 112, 2, depth=0.0)
    assert shallow["depth"] == 0.0
    assert shallow["prompt_loss_nats_per_token"] == pytest.approx(shallow2, rel=1e-5)
    assert shallow2 != pytest.approx(drawn2, rel=1e-3)
    # padded, the prompt sits after separators: the same tokens, read in another context
    assert padded["prompt_loss_nats_per_token"] != pytest.approx(drawn3, rel=1e-5)


def test_passkey_probe_locates_the_key_in_its_segment(tmp_path):
    """passkey_probe's per-example records: key_start/key_end are the key's digits in the padded row
    (rebuilt here from make_niah), key_offset is where it starts in its MAC segment, and the
    per-example and by-offset numbers add up to the totals."""
    import passkey_probe
    import torch

    from titans import TitansConfig, TitansLM
    from titans.data.tokenizer import ByteTokenizer
    from titans.tasks.niah import make_niah

    torch.manual_seed(0)
    seg = 16  # short segments: the keys of a few examples start in several of its eighths
    model = TitansLM(TitansConfig.from_preset("tiny", variant="mac", dim=32, n_layers=1, n_heads=2,
                                              mlp_hidden=64, segment_len=seg, window=seg))
    _save(tmp_path / "run", model)
    out = passkey_probe.probe(str(tmp_path / "run"), 112, 6, seed=3, pad_to=129)
    rows, tok = out["per_example"], ByteTokenizer()
    assert [r["seed"] for r in rows] == list(range(3, 9))
    for r in rows:
        ex = make_niah("single_1", 112, None, tokenizer=tok, seed=r["seed"])
        ids, answer = tok.encode(ex.prompt), tok.encode(ex.answer) + [tok.eos_id]
        row = [tok.eos_id] * (129 - len(ids) - len(answer)) + ids
        assert tok.decode(row[r["key_start"]:r["key_end"] + 1]) == ex.answer.strip()
        assert r["key_offset"] == r["key_start"] - r["key_start"] // seg * seg
        assert 0 <= r["digits_right"] <= r["digits"] == 5
    assert sum(r["digits_right"] for r in rows) / 30 == pytest.approx(out["digit_accuracy_teacher_forced"])
    assert sum(r["key_influence"] for r in rows) / 6 == pytest.approx(out["key_influence"])
    groups = out["by_key_offset"]
    assert len(groups) >= 2  # the examples fall in more than one stretch: the grouping is tested
    for g in groups:  # each example counted once, in the stretch of 2 offsets (16 / 8) its key starts in
        lo, hi = g["offsets"]
        assert hi - lo == 2
        members = [r for r in rows if lo <= r["key_offset"] < hi]
        assert g["examples"] == len(members)
        assert g["key_influence"] == pytest.approx(sum(r["key_influence"] for r in members) / len(members))
    assert sum(g["examples"] for g in groups) == 6
    whole = sum(g["digit_accuracy_teacher_forced"] * g["examples"] for g in groups) / 6
    assert whole == pytest.approx(out["digit_accuracy_teacher_forced"])
    # a transformer has no segments: no offsets, no by-offset summary
    model = TitansLM(TitansConfig.from_preset("tiny", variant="transformer", dim=32, n_layers=1, n_heads=2,
                                              mlp_hidden=64))
    _save(tmp_path / "tf", model)
    out = passkey_probe.probe(str(tmp_path / "tf"), 112, 2)
    assert "by_key_offset" not in out and "key_offset" not in out["per_example"][0]


@pytest.mark.parametrize("variant", ["mac", "lmm"])
def test_forgetting_horizon_reads_the_gates_the_recurrence_gets(tmp_path, monkeypatch, variant):
    """experiments/forgetting_horizon.py on a saved tiny model: its alpha (read off the gate map's
    output) is the alpha the layer hands to the memory recurrence, every prompt token once; the
    retention is the product of (1 - alpha) of the best head; forget_scale 0 keeps everything."""
    import forgetting_horizon
    import torch

    from titans import TitansConfig, TitansLM
    from titans.memory import layer as layer_mod

    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant=variant, dim=32, n_layers=2, n_heads=2,
                                              mlp_hidden=64, segment_len=32, window=32, n_persistent=2))
    with torch.no_grad():  # livelier forgetting gates than at init
        for m in model.modules():
            if isinstance(m, layer_mod.NeuralMemory):
                m.gates.weight.normal_(0, 0.3)
    _save(tmp_path / "run", model)
    seen = []
    real = layer_mod.run_memory

    def spy(q, k, v, alpha, eta, theta, weights, **kw):
        seen.append(alpha.detach()[0])  # (heads, T)
        return real(q, k, v, alpha, eta, theta, weights, **kw)

    monkeypatch.setattr(layer_mod, "run_memory", spy)
    out = forgetting_horizon.horizon(str(tmp_path / "run"), [150])
    rows = out["rows"]
    assert len(rows) == 2 and all(r["tokens_gated"] == r["length"] for r in rows)
    per_memory = len(seen) // 2  # the calls of block 0, then of block 1
    for i, r in enumerate(rows):
        alpha = torch.cat(seen[i * per_memory:(i + 1) * per_memory], dim=1)  # (heads, T)
        assert alpha.shape[1] == r["length"]
        assert r["alpha_mean"] == pytest.approx(alpha.mean().item(), rel=1e-5)
        keep = torch.prod(1 - alpha.double(), dim=1)
        assert r["retention_best_head"] == pytest.approx(keep.max().item(), rel=1e-4)
        assert 0 < r["retention_best_head"] < 1
    kept = forgetting_horizon.horizon(str(tmp_path / "run"), [150], forget_scale=0.0)
    assert all(r["alpha_mean"] == 0 and r["retention_best_head"] == 1 for r in kept["rows"])
    assert f"| blocks.0.mixer.memory | {rows[0]['length']} |" in forgetting_horizon.markdown(out)


def test_babilong_probe_supporting_fact_and_shortcut(tmp_path, corpus_dir, monkeypatch):
    """experiments/babilong_probe.py: the supporting fact it names holds the answer (checked against a
    replay of every story's moves), and its groups count the examples as a model answering the true
    room, or the last fact's room, would be scored."""
    import babilong_probe
    import torch

    from titans import TitansConfig, TitansLM
    from titans.tasks import make_babilong

    text = "The river ran on. It was late. " * 40
    for seed in range(100):
        ex = make_babilong(1, 500, haystack=text, seed=seed)
        where = {}
        for fact in ex.meta["facts"]:  # the replay: each move puts its person in its room
            where[fact.split()[0]] = fact.rstrip(".").split()[-1]
        person = ex.meta["babi_question"].split()[-1].rstrip("?")
        j = babilong_probe.supporting_fact(ex)
        assert where[person] == ex.answer.strip() == babilong_probe.fact_room(ex.meta["facts"][j])
        assert ex.meta["facts"][j].startswith(person) and not any(
            f.startswith(person) for f in ex.meta["facts"][j + 1:])

    torch.manual_seed(0)
    cfg = TitansConfig.from_preset("tiny", variant="mac", dim=32, n_layers=1, n_heads=2, segment_len=16,
                                   window=16, n_persistent=2, mlp_hidden=64)
    run = _save(tmp_path / "run", TitansLM(cfg))
    out = babilong_probe.probe(run, 500, 6, align=16, batch_size=4, data_dir=str(corpus_dir))
    per = out["per_example"]
    assert len(per) == 6 and out["accuracy"] == pytest.approx(sum(r["correct"] for r in per) / 6)
    for groups in (out["by_last_fact"], out["by_support_distance"]):
        assert sum(g["examples"] for g in groups.values()) == 6
    assert all(0 < r["support_distance_tokens"] <= 500 for r in per)

    def answering(pick):  # graded_answers replaced by one that says pick(example's facts, answer)
        def fake(model, tok, prompts, targets, **kw):
            rooms = {e.prompt: e for e in exs}
            return [{"generated": " " + pick(rooms[p].meta["facts"], t.strip()) + ".", "answer_nats": 1.0,
                     "answer_tokens": 2, "answer_right": 1} for p, t in zip(prompts, targets, strict=True)]
        return fake

    from titans.evaluate import haystack_text

    hay = haystack_text(corpus_dir)
    exs = [make_babilong(1, 500, haystack=hay, seed=i) for i in range(6)]
    monkeypatch.setattr("titans.evaluate.graded_answers", answering(lambda facts, answer: answer))
    right = babilong_probe.probe(run, 500, 6, data_dir=str(corpus_dir))
    assert right["accuracy"] == 1 and right["recency_accuracy"] == out["recency_accuracy"]
    monkeypatch.setattr("titans.evaluate.graded_answers",
                        answering(lambda facts, answer: babilong_probe.fact_room(facts[-1])))
    recent = babilong_probe.probe(run, 500, 6, data_dir=str(corpus_dir))
    assert recent["accuracy"] == recent["recency_accuracy"] and recent["answers_last_fact_room"] == 1
    assert recent["by_last_fact"]["about_the_asked_person"]["accuracy"] == 1

    # pooling runs over disjoint seeds (a long length split across processes) gives the one run's groups
    exs += [make_babilong(1, 500, haystack=hay, seed=i) for i in range(6, 9)]
    halves = [babilong_probe.probe(run, 500, 4, seed=0, data_dir=str(corpus_dir)),
              babilong_probe.probe(run, 500, 0, seeds=[6, 4, 8, 5, 7], data_dir=str(corpus_dir))]
    assert halves[1]["examples"] == 5 and [r["seed"] for r in halves[1]["per_example"]] == [4, 5, 6, 7, 8]
    whole = babilong_probe.probe(run, 500, 9, seed=0, data_dir=str(corpus_dir))
    pooled = babilong_probe.merge(halves)
    assert pooled["example_seeds"] == [r["seed"] for r in pooled["per_example"]] == list(range(9))
    for key in ("accuracy", "recency_accuracy", "majority_answer_share", "by_last_fact",
                "by_support_distance", "per_example"):
        assert pooled[key] == whole[key], key
    with pytest.raises(ValueError, match="share example seeds"):
        babilong_probe.merge([halves[0], halves[0]])
    with pytest.raises(ValueError, match="differ in"):
        babilong_probe.merge([halves[0], {**halves[1], "align": 64}])


def test_table5_rows_follow_the_base_config():
    """Under `--set forget_to=init` the forget-to-W_0 row would repeat the reference: the paper's rule
    takes its place, and every other ablation is kept."""
    import argparse

    import table5
    from table1 import parse_model_set

    p = argparse.ArgumentParser()
    base = parse_model_set(p, ["forget_to=init", "conv=false"])
    assert base == {"forget_to": "init", "conv": False}
    plain, init = table5.ablations({}), table5.ablations(base)
    assert plain == table5.ABLATIONS
    assert table5.PAPER_FORGETTING not in plain and init[table5.PAPER_FORGETTING] == {"forget_to": "zero"}
    assert "forgetting towards W_0 (not the paper)" not in init and len(init) == len(plain)
    with pytest.raises(SystemExit):
        parse_model_set(p, ["forget_to"])


def _table5_refusal(tmp_path, monkeypatch, capsys, reference: dict) -> str:
    """Run table5.py --steps 1000 against one reference run; it must exit before creating anything."""
    import json

    import table5

    ref = tmp_path / "t1"
    ref.mkdir()
    (ref / "mac-s0.json").write_text(json.dumps(reference))
    out = tmp_path / "t5"
    monkeypatch.setattr(sys, "argv", ["table5.py", "--steps", "1000", "--seeds", "0", "--table1", str(ref),
                                      "--out", str(out), "--runs", str(tmp_path / "runs")])
    with pytest.raises(SystemExit):
        table5.main()
    assert not out.exists()
    return capsys.readouterr().err


def test_table5_refuses_a_reference_of_another_budget(tmp_path, monkeypatch, capsys):
    """The reference row must come from Table-1 runs of the same step count, checked before training."""
    err = _table5_refusal(tmp_path, monkeypatch, capsys, {"steps": 200, "val_bpb": 3.5, "test_bpb": 3.5})
    assert "trained [200] steps, these ablations 1000" in err


def test_table5_refuses_a_reference_tested_on_other_lengths(tmp_path, monkeypatch, capsys):
    """The held-out test column is only comparable at equal tokens per document (Table 1's default is
    32768, Table 5's 8192): a reference scored otherwise is refused before training."""
    reference = {"steps": 1000, "test_tokens": 32768, "test_bpb": 2.6}
    err = _table5_refusal(tmp_path, monkeypatch, capsys, reference)
    assert "tested on [32768] tokens per held-out document, these ablations on 8192" in err
    assert "--test-tokens 32768" in err


def test_table_runs_checkpoint_every_quarter_so_a_cut_run_resumes(tmp_path):
    """A Table-1/5 run of 1000 steps takes 20-35 min; one cut short by the end of a session resumes
    from a checkpoint at most a quarter of its steps back, and only one is kept on disk."""
    import table1

    cfg = table1.config("mac", 0, 1000, tmp_path / "run", "data")
    assert cfg.train.ckpt_every == 250 and cfg.train.keep_last == 1 and cfg.train.steps == 1000
    assert table1.config("mac", 0, 3, tmp_path / "run", "data").train.ckpt_every == 1


def test_table5_records_a_diverged_run_as_a_result(tmp_path, monkeypatch):
    """A row whose training diverges is a finding (the paper's forgetting rule overflows on some seeds):
    table5 records the step and what became non-finite, does not train it again, names it under the
    table and keeps it out of the mean."""
    import json

    import table5

    import titans.train
    from titans.errors import TrainingDiverged

    calls = []

    def diverging(cfg, **kwargs):
        calls.append(cfg.train.seed)
        run = Path(cfg.train.out)  # its metrics, step 2 logged twice (as by a resumed run)
        run.mkdir(parents=True)
        steps = [(1, 0.5), (2, 20.0), (2, 30.0), (3, 3.0)]
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "grad_norm": g}) + "\n"
                                                   for i, g in steps))
        raise TrainingDiverged("the gradient became nan at step 492", step=492, quantity="gradient",
                               value=float("nan"))

    monkeypatch.setattr(titans.train, "train", diverging)
    ref = tmp_path / "t1"
    ref.mkdir()
    for seed, bpb in ((0, 2.6), (1, 2.62)):
        (ref / f"mac-s{seed}.json").write_text(json.dumps(
            {"steps": 1000, "test_tokens": 8192, "val_bpb": bpb, "test_bpb": bpb, "parameters": 1000}))
    out = tmp_path / "t5"
    argv = ["table5.py", "--steps", "1000", "--seeds", "1", "--only", "no_conv", "--table1", str(ref),
            "--out", str(out), "--runs", str(tmp_path / "runs")]
    monkeypatch.setattr(sys, "argv", argv)
    assert table5.main() == 0
    record = json.loads((out / "no_conv-s1.json").read_text())
    assert record["diverged_at_step"] == 492 and record["diverged"] == "gradient nan"
    record = table5.with_grad_stats(out / "no_conv-s1.json")
    text = (out / "table.md").read_text()
    assert "| no conv | | 0 (+1 diverged) | diverged | diverged | s1: 30, 1 of 3 |" in text
    assert json.loads((out / "no_conv-s1.json").read_text())["grad_norm_median"] == 3.0  # saved in the record
    assert "- no conv, seed 1: training diverged (gradient nan) at step 492 of 1000; not in the mean." in text
    assert "| MAC (reference, Table 1) | 1,000 | 2 | 2.610 ± 0.014 |" in text
    assert table5.main() == 0 and calls == [1]  # recorded: not trained again
    # a row with one finished and one diverged seed: the mean is the finished one's
    finished = {"seed": 0, "val_bpb": 2.7, "test_bpb": 2.8, "parameters": 1000}
    mixed = table5.table({"no conv": [finished, record]})
    assert "| no conv | 1,000 | 1 (+1 diverged) | 2.700 | 2.800 |" in mixed
