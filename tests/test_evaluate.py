"""Streaming evaluation: the streamed numbers equal direct computations, tasks run end to end, the
CLI writes its report and refuses bad input in one line."""

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from titans import TitansConfig, TitansLM
from titans.cli import main as cli
from titans.data.tokenizer import ByteTokenizer
from titans.device import pick_device
from titans.errors import TitansError
from titans.evaluate import (
    answer,
    answers,
    eval_mqar,
    eval_position,
    eval_ppl,
    eval_text_task,
    graded_answers,
    greedy_continue,
    lambada_examples,
    parse_lengths,
    stream,
)
from titans.train import load_config, train


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = TitansConfig.from_preset("tiny", variant="mac", dim=32, n_layers=2, n_heads=2, segment_len=16,
                                   window=16, n_persistent=2, mlp_hidden=64)
    return TitansLM(cfg).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    sets = {"model.dim": 32, "model.n_layers": 2, "model.n_heads": 2, "model.segment_len": 16,
            "model.window": 16, "model.n_persistent": 2, "model.mlp_hidden": 64, "data.dir": str(corpus_dir),
            "data.seq_len": 32, "train.steps": 2, "train.batch_size": 2, "train.eval_windows": 2,
            "train.progress": False, "train.tensorboard": False, "train.out": str(out)}
    train(load_config(None, [f"{k}={v}" for k, v in sets.items()]), log=lambda *a: None)
    return out


def test_parse_lengths():
    assert parse_lengths("1k,4k,16K,1m,300") == [1024, 4096, 16384, 1024 ** 2, 300]
    for bad in ("", "1g", "k", "0"):
        with pytest.raises(TitansError, match="--lengths"):
            parse_lengths(bad)


def test_streamed_losses_equal_one_forward_pass(model):
    ids = torch.randint(0, 256, (100,))
    logits, _ = model(ids[None])
    direct = F.cross_entropy(logits[0, :-1], ids[1:], reduction="none")
    last, _, streamed = stream(model, ids, piece=7, losses=True)
    assert streamed.shape == (99,)
    torch.testing.assert_close(streamed, direct, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, logits[0, -1], rtol=1e-4, atol=1e-4)


def test_greedy_answer_equals_generate(model):
    tok = ByteTokenizer()
    prompt = "The pass key is 4821. What is the pass key?"
    for separator in (True, False):  # the prompt read as a document (after the separator) or bare
        got = answer(model, tok, prompt, 12, piece=5, separator=separator)
        ids = torch.tensor([[tok.eos_id] * separator + tok.encode(prompt)])
        ref = model.generate(ids, 12, temperature=0)[0, ids.shape[1]:].tolist()
        if tok.eos_id in ref:
            ref = ref[:ref.index(tok.eos_id)]
        assert got == tok.decode(ref)


def test_batched_answers_equal_one_by_one(model):
    """answers() streams prompts side by side: equal-length prompts give exactly the solo answers;
    a shorter prompt gives the solo answer of itself behind the leading separators it was padded
    with; each row is cut to its own token budget."""
    tok = ByteTokenizer()
    same = ["The pass key is 4821. Key?", "The pass key is 7310. Key?", "A cat sat on a mat. Where?"]
    assert len({len(tok.encode(p)) for p in same}) == 1
    assert answers(model, tok, same, 9, piece=5) == [answer(model, tok, p, 9, piece=5) for p in same]
    short, long = "Where is Mary?", "Mary went to the kitchen. Where is Mary?"
    got = answers(model, tok, [short, long], [3, 10], piece=7)
    assert got[1] == answer(model, tok, long, 10, piece=7)
    pad = len(tok.encode(long)) - len(tok.encode(short))
    # behind its own separator and the padding
    logits, state, _ = stream(model, [tok.eos_id] * (pad + 1) + tok.encode(short), piece=7)
    assert got[0] == tok.decode(greedy_continue(model, logits, state, 3, {tok.eos_id}))
    with pytest.raises(ValueError, match="one per prompt"):
        answers(model, tok, [short, long], [3])
    with pytest.raises(ValueError, match="no prompts"):
        answers(model, tok, [], 3)


def test_graded_answers_equal_one_forward_pass(model):
    """The teacher-forced answer loss and hits equal one forward pass over the padded rows with the
    targets appended; fed its own greedy answer, a model gets every token right; the greedy part is
    `answers`' own."""
    tok = ByteTokenizer()
    prompts = ["Where is Mary?", "Mary went to the kitchen. Where is Mary?"]
    targets = [" kitchen", " 42"]
    got = graded_answers(model, tok, prompts, targets, piece=5)
    assert [g["generated"] for g in got] == answers(model, tok, prompts, [12, 7], piece=5)
    n = max(len(tok.encode(p)) for p in prompts) + 1
    aligned = graded_answers(model, tok, prompts, targets, piece=5, align=16)
    for rows in (got, aligned):
        for p, t, g in zip(prompts, targets, rows, strict=True):
            goal = tok.encode(t)
            # aligned: each row's own target ends a block of 16 (" kitchen" 8 tokens, " 42" 3), the
            # rows read apart (their targets differ in length), each behind its own separator
            width = n if rows is got else len(tok.encode(p)) + 1
            width += -(width + len(goal)) % 16 if rows is aligned else 0
            head = [tok.eos_id] * (width - len(tok.encode(p))) + tok.encode(p)
            logits, _ = model(torch.tensor([head + goal]))
            pred = logits[0, len(head) - 1:-1].float()
            nats = F.cross_entropy(pred, torch.tensor(goal), reduction="sum").item()
            assert g["answer_tokens"] == len(goal)
            assert g["answer_nats"] == pytest.approx(nats, rel=1e-4)
            assert g["answer_right"] == int((pred.argmax(-1) == torch.tensor(goal)).sum())
    assert [a["answer_nats"] for a in aligned] != [g["answer_nats"] for g in got]
    # fed its own greedy answer, every token is the argmax (a head that can only write letters, so
    # that the answer survives decoding and encoding again)
    letters = copy.deepcopy(model)
    with torch.no_grad():
        keep = torch.zeros(256, dtype=torch.bool)
        keep[ord("a"):ord("z") + 1] = True
        letters.head.weight[~keep] = 0.0
        letters.head.weight[keep] *= 50.0
    mine = [g["generated"][:5] for g in graded_answers(letters, tok, prompts, targets, piece=5)]
    assert all(len(m) == 5 and m.isalpha() for m in mine)
    own = graded_answers(letters, tok, prompts, mine, piece=5)
    assert [o["answer_right"] for o in own] == [5, 5]
    assert all(o["answer_nats"] > 0 for o in own)
    with pytest.raises(ValueError, match="one target per prompt"):
        graded_answers(model, tok, prompts, targets[:1])
    with pytest.raises(ValueError, match="at least one token"):
        graded_answers(model, tok, prompts, ["", " 7"])
    with pytest.raises(ValueError, match="align must be an int >= 0"):
        graded_answers(model, tok, prompts, targets, align=-16)


def test_batched_stream_rows_equal_single_rows(model):
    ids = torch.randint(0, 256, (3, 40))
    last, _, _ = stream(model, ids, piece=9)
    assert last.shape == (3, 256)
    for b in range(3):
        torch.testing.assert_close(last[b], stream(model, ids[b], piece=9)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one row"):
        stream(model, ids, losses=True)
    with pytest.raises(ValueError, match=r"\(T,\) or \(B, T\)"):
        stream(model, ids[None])


def test_greedy_continue_stops_each_row_at_its_stop_id(model):
    logits = torch.zeros(2, 256)
    logits[0, 5], logits[1, 7] = 1.0, 1.0
    state = model.init_state(2)
    out = greedy_continue(model, logits, state, 4, stop_ids={7})
    assert out[1] == [] and len(out[0]) >= 1 and out[0][0] == 5


def test_batched_mqar_equals_one_by_one(model):
    one = eval_mqar(model, [64], n_examples=3, n_pairs=4, piece=20, log=lambda *a: None)
    three = eval_mqar(model, [64], n_examples=3, n_pairs=4, piece=20, batch_size=2, log=lambda *a: None)
    assert one[0]["accuracy"] == three[0]["accuracy"] and one[0]["n"] == three[0]["n"] == 3
    with pytest.raises(TitansError, match="batch size"):
        eval_mqar(model, [64], n_examples=3, batch_size=0, log=lambda *a: None)


def test_text_task_rows(model, corpus_dir):
    from titans.evaluate import haystack_text

    rows = eval_text_task(model, ByteTokenizer(), "niah_single_2", [300, 600], n_examples=2,
                          haystack=haystack_text(corpus_dir), log=lambda *a: None)
    assert [r["length"] for r in rows] == [300, 600]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["n"] == 2 and len(r["samples"]) == 2
        assert all(s["answer"].strip().isdigit() for s in r["samples"])
        assert 0 <= r["answer_token_accuracy"] <= 1 and r["answer_loss"] > 0
    kw = dict(n_examples=3, haystack=haystack_text(corpus_dir), log=lambda *a: None)
    solo = eval_text_task(model, ByteTokenizer(), "babilong_qa1", [400], **kw)
    side = eval_text_task(model, ByteTokenizer(), "babilong_qa1", [400], batch_size=2, **kw)
    assert side[0]["n"] == 3 and len(side[0]["samples"]) == 3  # the same examples, in the same order
    assert [(s["depth"], s["answer"]) for s in side[0]["samples"]] == \
        [(s["depth"], s["answer"]) for s in solo[0]["samples"]]
    with pytest.raises(TitansError, match="batch size"):
        eval_text_task(model, ByteTokenizer(), "babilong_qa1", [400], batch_size=0, **kw)
    for r in rows + solo:  # counts, interval and the constant-answer bar agree with the examples
        answers = [s["answer"] for s in r["samples"]]
        assert r["correct"] == sum(s["correct"] for s in r["samples"]) == round(r["accuracy"] * r["n"])
        assert r["majority_answer_share"] == max(answers.count(a) for a in answers) / r["n"]
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]


def test_wilson_interval():
    from titans.evaluate import wilson_interval

    # published values: 0 of 10 -> (0, 0.2775); 15 of 30 -> 0.5 +- 0.1685
    assert wilson_interval(0, 10)[0] == 0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(15, 30)
    assert lo == pytest.approx(0.3315, abs=1e-4) and hi == pytest.approx(0.6685, abs=1e-4)
    # the interval holds k/n, mirrors at n - k and narrows as n grows at the same share
    for k, n in [(1, 3), (9, 30), (29, 30), (30, 30)]:
        lo, hi = wilson_interval(k, n)
        assert lo <= k / n <= hi
        mlo, mhi = wilson_interval(n - k, n)
        assert mlo == pytest.approx(1 - hi) and mhi == pytest.approx(1 - lo)
    assert wilson_interval(150, 300)[1] < wilson_interval(15, 30)[1]
    for bad, match in [((3, 2), "0 <= k <= n"), ((0, 0), "n >= 1"), ((-1, 5), "0 <= k <= n"),
                       ((1.0, 5), "integers"), ((True, 5), "integers")]:
        with pytest.raises(TitansError, match=match):
            wilson_interval(*bad)


def test_ppl_matches_a_direct_computation(model, corpus_dir):
    from titans.data.corpus import load_documents

    tok = ByteTokenizer()
    rows = eval_ppl(model, tok, corpus_dir, max_tokens=200, piece=64, log=lambda *a: None)
    first = rows[0]
    doc = next(d for d in load_documents(corpus_dir, "test") if d.id == first["document"])
    ids = torch.tensor(tok.encode(doc.text)[:200])
    logits, _ = model(ids[None])
    nats = F.cross_entropy(logits[0, :-1], ids[1:], reduction="sum").item()
    assert first["bpb"] == pytest.approx(nats / math.log(2) / len(bytes(ids[1:].tolist())), rel=1e-4)
    assert rows[-1]["document"] == "ALL"


def test_position_bins_cover_the_stream(model, corpus_dir):
    rows = eval_position(model, ByteTokenizer(), corpus_dir, max_tokens=1000, piece=128, log=lambda *a: None)
    assert [r["start"] for r in rows] == [2 ** b for b in range(len(rows))]
    assert rows[-1]["end"] >= 999 and all(math.isfinite(r["bits_per_token"]) for r in rows)


def test_lambada_examples_end_before_the_last_word():
    text = ("It was a dark and stormy night, and the rain fell in torrents over the quiet little town "
            "where nobody ever walked after dusk because of the wolves. ") * 30
    tok = ByteTokenizer()
    exs = lambada_examples(text, 5, 200, tok)
    assert len(exs) == 5
    for ctx, word in exs:
        assert word in (" wolves", " dusk") or word.strip().isalpha()
        assert (ctx + word) in text and len(tok.encode(ctx)) <= 200


def test_eval_cli_writes_the_report(run_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli(["eval", "--checkpoint", str(run_dir), "--task", "niah,mqar,ppl", "--lengths", "256,512",
                "--examples", "2", "--data", str(corpus_dir), "--max-tokens", "300", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert result["device"] == "cpu"
    tasks = {r["task"] for r in result["rows"]}
    assert {"niah_single_1", "niah_single_2", "niah_single_3", "mqar", "ppl"} <= tasks
    md = (out / "result.md").read_text()
    assert "| niah_single_1 |" in md and "bits per byte" in md
    assert (out / "result.png").stat().st_size > 5000
    assert str(out / "result.md") in capsys.readouterr().out
    assert "Teacher-forced" in md and "--align" not in md
    # answers laid out to end a block of 16 tokens: recorded in the JSON and said in the report
    code = cli(["eval", "--checkpoint", str(run_dir), "--task", "niah_single_1", "--lengths", "256",
                "--examples", "2", "--data", str(corpus_dir), "--align", "16", "--out", str(tmp_path / "al")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "al" / "result.json").read_text())["align"] == 16
    assert "ends a block of 16 tokens" in (tmp_path / "al" / "result.md").read_text()
    assert "--forget-scale" not in (tmp_path / "al" / "result.md").read_text()
    # read with slower forgetting: recorded, said, and it changes what the memory keeps
    code = cli(["eval", "--checkpoint", str(run_dir), "--task", "niah_single_1", "--lengths", "256",
                "--examples", "2", "--data", str(corpus_dir), "--align", "16", "--forget-scale", "0",
                "--out", str(tmp_path / "fs")])
    assert code == 0, capsys.readouterr().err
    slow, base = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("fs", "al"))
    assert slow["forget_scale"] == 0.0 and base["forget_scale"] == 1.0
    assert "multiplied by 0 (`forget_scale`" in (tmp_path / "fs" / "result.md").read_text()
    loss = lambda r: [row.get("answer_loss") for row in r["rows"]]  # noqa: E731
    assert loss(slow) != loss(base)
    # a run trained with model.forget_scale=0 is read at 0 unless told otherwise, and says so
    trained0 = tmp_path / "run0"
    shutil.copytree(run_dir, trained0)
    for cfg_file in trained0.glob("checkpoints/*/config.json"):
        saved = json.loads(cfg_file.read_text())
        saved["model"]["forget_scale"] = 0.0
        cfg_file.write_text(json.dumps(saved))
    for flag, name, same in (([], "d0", slow), (["--forget-scale", "1"], "d1", base)):
        code = cli(["eval", "--checkpoint", str(trained0), "--task", "niah_single_1", "--lengths", "256",
                    "--examples", "2", "--data", str(corpus_dir), "--align", "16", *flag,
                    "--out", str(tmp_path / name)])
        assert code == 0, capsys.readouterr().err
        got = json.loads((tmp_path / name / "result.json").read_text())
        assert got["forget_scale"] == same["forget_scale"] and loss(got) == loss(same), name


def test_device_choice_is_validated():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "cuda1"):
        with pytest.raises(TitansError, match="auto, cpu, cuda or cuda:N"):
            pick_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(TitansError, match="CUDA is not available"):
            pick_device("cuda:0")


def test_eval_cli_errors_are_one_line(run_dir, capsys):
    assert cli(["eval", "--checkpoint", str(run_dir), "--task", "mqar", "--device", "tpu"]) == 1
    assert "the device must be auto, cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err
    assert cli(["eval", "--checkpoint", str(run_dir), "--task", "niha"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'niah'" in err[0]
    assert cli(["eval", "--checkpoint", str(Path(run_dir) / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli(["eval", "--checkpoint", str(run_dir), "--task", "mqar", "--cuda-graphs"]) == 1
    assert "--cuda-graphs needs a CUDA device, got cpu" in capsys.readouterr().err
    assert cli(["eval", "--checkpoint", str(run_dir), "--task", "niah", "--align", "-4"]) == 1
    assert "--align must be an int >= 0 (0: off), got -4" in capsys.readouterr().err
    assert cli(["eval", "--checkpoint", str(run_dir), "--task", "niah", "--forget-scale", "1.5"]) == 1
    assert "--forget-scale: forget_scale must be a number in [0, 1]" in capsys.readouterr().err
