"""`titans inspect`: the per-token measurements of the memory on a document, checked against an
independent float64 reference, and the report files and command."""

import argparse
import json
import random

import numpy as np
import pytest
import torch

from titans import TitansLM
from titans.checkpoint import save_checkpoint
from titans.data.tokenizer import ByteTokenizer
from titans.errors import TitansError
from titans.inspect import (
    DEFAULT_NEEDLE,
    add_arguments,
    build_stream,
    format_table,
    inspect_memory,
    run,
    write_report,
)
from titans.memory import memory_apply, memory_recurrent
from titans.model import TitansConfig

WORDS = "the king spoke of love and night while the noble crown fell to a fair hand in time".split()


def text_of(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + ".\n"


def tiny(variant: str, **kw) -> TitansLM:
    torch.manual_seed(0)
    cfg = TitansConfig.from_preset("tiny", variant=variant, dim=32, n_layers=2, n_heads=2, segment_len=16,
                                   window=16, n_persistent=2, mlp_hidden=64, chunk_size=8, **kw)
    return TitansLM(cfg).eval()


TOK = ByteTokenizer()
TEXT = text_of(60)  # about 300 bytes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: a second thread only spins (60x slower on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mac_result(one_thread):
    return inspect_memory(tiny("mac"), TOK, TEXT, max_tokens=200, recall_every=64)


def test_every_series_has_its_shape_and_is_finite(mac_result):
    r = mac_result
    T = len(r["tokens"])
    assert T == 200 and len(r["pieces"]) == T and r["loss"].shape == (T,)
    assert [m["layer"] for m in r["layers"]] == [0, 1]
    for m in r["layers"]:
        assert m["mixer"] == "MAC"
        for name in ("surprise", "alpha", "eta", "theta"):
            assert m[name].shape == (2, T), name
            assert np.isfinite(m[name]).all(), name
        assert (m["surprise"] > 0).all()
        C = len(m["recall_at"])
        assert m["recall_needle"].shape == m["recall_sample"].shape == (2, C)
        assert m["recall_at"][-1] == T
        # the needle is measured just before it, right after it and later; never half-written
        start, end = r["needle"]["start"], r["needle"]["end"]
        measured = m["recall_at"][~np.isnan(m["recall_needle"][0])]
        assert start in measured and end in measured and T in measured
        assert not ((measured > start) & (measured < end)).any()
        assert np.isfinite(m["recall_needle"][:, np.isin(m["recall_at"], measured)]).all()
        assert np.isfinite(m["recall_sample"][:, 1:]).all() and (m["recall_sample"][:, 1:] >= 0).all()
        assert m["recall_age"].shape == (2, len(m["recall_age_bins"]))
        # the replay of the captured stream ends where the model's own memory ended
        assert m["replay_error"] < 1e-4
        assert m["needle_ratio"] > 0 and np.isfinite(m["median_surprise"])


def test_surprise_equals_autograd_on_the_reference_memory_in_float64():
    model = tiny("lmm")
    r = inspect_memory(model, TOK, TEXT, max_tokens=120)
    ids = torch.tensor([r["tokens"]])
    mem = model.blocks[0].mixer.memory
    with torch.no_grad():  # what block 0's memory receives, computed here without the inspect hooks
        x = model.blocks[0].norm1(model.embed(ids))
        _, k, v, _ = mem._qkv(x, None)
        alpha, eta, theta, _ = mem._gates(x, None)
    b, t, h = mem.chunk_size, 45, 1
    start = t - t % b  # the recurrence takes token t's gradient at the weights after `start` tokens
    k, v, alpha, eta, theta = (z.double() for z in (k, v, alpha, eta, theta))
    W0 = tuple(w.detach().double() for w in mem.weights)
    ln = tuple(p.detach().double() for p in mem.ln)
    _, state = memory_recurrent(k[:, :, :start], k[:, :, :start], v[:, :, :start], alpha[:, :, :start],
                                eta[:, :, :start], theta[:, :, :start], W0, chunk_size=b, ln=ln,
                                grad_clip=mem.grad_clip)
    W = tuple(w[:, h].clone().requires_grad_() for w in state.weights)  # (1, D_in, D_out) for head h
    pred = memory_apply(k[:, h:h + 1, t:t + 1], tuple(w.unsqueeze(1) for w in W),
                        (ln[0][h:h + 1], ln[1][h:h + 1]))
    loss = 0.5 * (pred[0, 0, 0] - v[0, h, t]).pow(2).sum()
    expected = torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(loss, W))).item()
    assert r["layers"][0]["surprise"][h, t] == pytest.approx(expected, rel=1e-4)

    # the scales of the values and of the memory's outputs for their keys (weights at each chunk start)
    T = v.shape[2]
    assert r["layers"][0]["value_norm"] == pytest.approx(v[0].norm(dim=-1).median().item(), rel=1e-5)
    norms = []
    for start in range(0, T, b):
        W = W0
        if start:
            _, st = memory_recurrent(k[:, :, :start], k[:, :, :start], v[:, :, :start], alpha[:, :, :start],
                                     eta[:, :, :start], theta[:, :, :start], W0, chunk_size=b, ln=ln,
                                     grad_clip=mem.grad_clip)
            W = st.weights
        norms.append(memory_apply(k[:, :, start:start + b], W, ln)[0].norm(dim=-1))
    assert r["layers"][0]["output_norm"] == pytest.approx(torch.cat(norms, 1).median().item(), rel=1e-5)


def test_gates_lie_in_their_ranges(mac_result):
    for m in mac_result["layers"]:
        assert ((m["alpha"] > 0) & (m["alpha"] < 1)).all()
        assert ((m["eta"] > 0) & (m["eta"] < 1)).all()
        assert ((m["theta"] > 0) & (m["theta"] <= m["theta_max"])).all()
    ttt = inspect_memory(tiny("ttt_mlp"), TOK, TEXT, max_tokens=64)  # no momentum, no forgetting
    for m in ttt["layers"]:
        assert (m["alpha"] == 0).all() and (m["eta"] == 0).all() and (m["theta"] > 0).all()
    per_layer = inspect_memory(tiny("lmm", per_layer_gates=True), TOK, TEXT, max_tokens=64)
    for m in per_layer["layers"]:  # one gate per memory layer (depth 2)
        assert m["alpha"].shape == m["theta"].shape == (2, 64, 2) and m["replay_error"] < 1e-4
        assert ((m["alpha"] > 0) & (m["alpha"] < 1)).all() and (m["theta"] <= m["theta_max"]).all()
    assert format_table(per_layer).count(" LMM ") == 2
    anchored = inspect_memory(tiny("lmm", forget_to="init"), TOK, TEXT, max_tokens=200)
    assert all(m["replay_error"] < 1e-4 for m in anchored["layers"])  # follows forget_to (0.7 if not)


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_the_needle_span_is_located_in_the_token_stream(depth):
    needle = "The secret pass key is 48213. Remember it."
    ids, (start, end) = build_stream(TOK, TEXT, needle, depth, 150)
    assert len(ids) <= 150
    assert TOK.decode(ids[start:end]).strip() == needle
    before = TOK.decode(ids[:start])
    assert TEXT.startswith(before)  # the document is intact up to the needle
    assert before == "" or before[-1].isspace() or TOK.decode(ids[start:end])[0].isspace()
    assert abs(start - depth * (150 - (end - start))) <= 70
    assert TOK.decode(ids).count(needle) == 1
    assert build_stream(TOK, TEXT, "", depth, 150) == (TOK.encode(TEXT)[:150], None)


def test_report_writes_png_html_and_json(mac_result, tmp_path):
    png, page = write_report(mac_result, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = page.read_text(encoding="utf-8")
    T = len(mac_result["tokens"])
    assert doc.count("<span") == T and doc.count('title="pos ') == T
    start = mac_result["needle"]["start"]
    assert f'title="pos {start} ' in doc and "[needle]" in doc
    assert "block 1: surprise" in doc and "alpha" in doc and "theta" in doc
    assert "<script src" not in doc and "<link" not in doc and "data:image/png;base64," in doc
    assert "median |M(k)|" in doc and f"<td>{mac_result['layers'][0]['value_norm']:.3g}</td>" in doc
    data = json.loads((tmp_path / "inspect.json").read_text())
    assert np.array(data["layers"][1]["surprise"]).shape == (2, T)
    assert data["needle"]["text"] == DEFAULT_NEEDLE
    table = format_table(mac_result)
    assert "needle" in table and "|M(k)|" in table and len(table.splitlines()) == 4 + 2 + 2


def test_a_model_without_neural_memory_gets_a_clear_error():
    with pytest.raises(TitansError, match="no neural memory.*lmm, mac, mag, mal and ttt_mlp"):
        inspect_memory(tiny("transformer"), TOK, TEXT, max_tokens=64)


def test_the_command_runs_on_a_saved_checkpoint(tmp_path, capsys):
    model = tiny("mag")
    save_checkpoint(tmp_path / "run", 1, model_state=model.state_dict(), config=model.config, train_config={},
                    tokenizer=TOK, trainer_state={}, tokens_seen=0)
    (tmp_path / "doc.txt").write_text(text_of(40, seed=1), encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "report"
    args = parser.parse_args(["--checkpoint", str(tmp_path / "run"), "--text", str(tmp_path / "doc.txt"),
                              "--max-tokens", "100", "--depth", "0.25", "--out", str(out), "--layer", "1",
                              "--head", "0", "--recall-every", "32"])
    assert run(args) == 0
    printed = capsys.readouterr().out
    assert "Plot:" in printed and "MAG" in printed
    data = json.loads((out / "inspect.json").read_text())
    assert [m["layer"] for m in data["layers"]] == [1]
    assert (out / "inspect.png").stat().st_size > 0 and (out / "inspect.html").stat().st_size > 0
    args.text = tmp_path / "missing.txt"
    with pytest.raises(TitansError, match="cannot read"):
        run(args)
