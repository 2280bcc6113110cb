"""The memory demo runs and its measured numbers show what it promises (titans/memory_demo.py)."""

import json
import math

import pytest

from titans.memory_demo import JSON_NAME, PNG_NAME, format_table, memory_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, memory_demo(out, seed=0)


def test_writes_png_and_json(demo):
    out, r = demo
    png, js = out / PNG_NAME, out / JSON_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000  # three panels, not an empty figure
    saved = json.loads(js.read_text())
    assert saved["recall_after_pass"] == r["recall_after_pass"]
    assert saved["alpha_sweep"] == r["alpha_sweep"]


def test_numbers_are_finite_and_shaped(demo):
    _, r = demo
    s = r["settings"]
    T = s["pairs"] * s["passes"]
    assert len(r["surprise"]) == len(r["recall_all"]) == len(r["recall_written"]) == T
    assert len(r["recall_per_pair"]) == T and all(len(row) == s["pairs"] for row in r["recall_per_pair"])
    flat = [*r["surprise"], *r["recall_all"], *(x for row in r["recall_per_pair"] for x in row)]
    assert all(math.isfinite(x) and x >= 0 for x in flat)


def test_recall_error_falls_as_pairs_are_written(demo):
    _, r = demo
    before, passes = r["recall_before"], r["recall_after_pass"]
    assert before > 0.5  # an unwritten memory does not know the values
    assert passes[0] < 0.5 * before
    assert all(b < 0.5 * a for a, b in zip(passes, passes[1:], strict=False))  # each repeat helps
    assert passes[-1] < 0.05
    # each pair's error drops on the token that writes it for the first time
    P = r["settings"]["pairs"]
    rows = [r["recall_before_per_pair"], *r["recall_per_pair"]]
    for i in range(P):
        assert rows[i + 1][i] < 0.5 * rows[i][i]


def test_surprise_high_on_novel_low_on_repeats(demo):
    _, r = demo
    P = r["settings"]["pairs"]
    novel, *repeats = r["surprise_mean_pass"]
    assert all(rep < 0.5 * novel for rep in repeats)
    assert repeats == sorted(repeats, reverse=True)
    # token by token: every repeat is less surprising than the smallest novel token
    assert max(r["surprise"][P:]) < min(r["surprise"][:P])


def test_recall_decays_as_alpha_rises(demo):
    _, r = demo
    sweep = r["alpha_sweep"]
    assert sweep[0]["alpha"] == 0 and sweep[-1]["alpha"] >= 0.1
    earliest = [row["earliest"] for row in sweep]
    assert earliest == sorted(earliest)  # monotone in alpha
    assert earliest[-1] > 10 * earliest[0]
    # forgetting hits the pairs written longest ago hardest
    assert sweep[-1]["earliest"] > sweep[-1]["latest"]


def test_measurements_agree_with_the_memory_state(demo):
    _, r = demo
    c = r["checks"]
    assert c["surprise_vs_applied_gradient_max_rel_err"] < 1e-4
    assert c["token_by_token_vs_one_call_max_abs_diff"] < 1e-5


def test_table_shows_the_measured_numbers(demo):
    _, r = demo
    table = format_table(r)
    assert f"{r['recall_after_pass'][0]:.4f}" in table
    assert f"{r['surprise_mean_pass'][0]:.3f}" in table
    assert f"{r['alpha_sweep'][-1]['earliest']:.4f}" in table
    assert "linear" in table


def test_seed_changes_data_not_conclusions(demo, tmp_path):
    r = memory_demo(tmp_path, seed=1)
    assert r["surprise_mean_pass"][1] < 0.5 * r["surprise_mean_pass"][0]
    assert r["recall_after_pass"][-1] < r["recall_after_pass"][0]
    assert r["alpha_sweep"][-1]["earliest"] > r["alpha_sweep"][0]["earliest"]
    assert r["surprise"] != demo[1]["surprise"]
