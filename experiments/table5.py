"""Table-5 analog (ablations) at CPU scale: the tiny MAC with one component changed at a time, at
the same token budget as experiments/table1.py (its `mac` runs are the reference row).

    python experiments/table5.py --steps 200 --seeds 0,1
    python experiments/table5.py --steps 1000 --seeds 0,1 --set forget_to=init \
        --table1 results/table1_2M --out results/table5_2M --runs out/table5_2M   # as Table 1 at 2.05M

Checkpoints in out/table5/, numbers in results/table5/ (RUN.json, table.md). `--set` changes every
run, the reference included (it must match the Table-1 runs named by `--table1`); with
`--set forget_to=init` the row "forgetting towards W_0" would repeat the reference, so the paper's
rule (towards zero) takes its place.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table1 import _mean_sd, add_model_set, config, parse_model_set  # noqa: E402  (same settings as Table 1)

ABLATIONS = {  # name: TitansConfig overrides of the tiny MAC
    "linear memory (depth 1)": {"memory_depth": 1},
    "memory depth 3": {"memory_depth": 3},
    "memory depth 4": {"memory_depth": 4},
    "no conv": {"conv": False},
    "no momentum": {"momentum": False},
    "no forgetting": {"forgetting": False},
    "no persistent memory": {"n_persistent": 0},
    # not an ablation of the paper: forgetting towards the learned initial weights (docs/training.md)
    "forgetting towards W_0 (not the paper)": {"forget_to": "init"},
}
PAPER_FORGETTING = "forgetting towards zero (the paper's rule)"  # replaces the row above under forget_to=init


def ablations(model_set: dict) -> dict:
    """The rows to train on top of the base config `model_set` (the Table-1 overrides)."""
    rows = dict(ABLATIONS)
    if model_set.get("forget_to") == "init":
        del rows["forgetting towards W_0 (not the paper)"]
        rows[PAPER_FORGETTING] = {"forget_to": "zero"}
    return rows


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def main() -> int:
    from titans.checkpoint import list_checkpoints, load
    from titans.errors import TrainingDiverged
    from titans.evaluate import eval_ppl
    from titans.train import stop_if_interrupted, train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument("--data", default="data")
    p.add_argument("--test-tokens", type=int, default=8192,
                   help="tokens per held-out document scored (must match the reference runs)")
    p.add_argument("--runs", default="out/table5")
    p.add_argument("--out", default="results/table5")
    p.add_argument("--table1", default="results/table1", help="where the reference mac runs are")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--only", type=lambda s: s.split(","), default=None, metavar="SLUGS",
                   help="run only these ablations (their file-name slugs, e.g. no_conv,no_momentum)")
    add_model_set(p)
    args = p.parse_args()
    args.model_set = parse_model_set(p, args.model_set)
    rows_to_train = ablations(args.model_set)
    reference = [  # checked before any training
        json.loads(f.read_text()) for f in sorted(Path(args.table1).glob("mac-s*.json"))]
    if any(r["steps"] != args.steps for r in reference):
        trained = sorted({r["steps"] for r in reference})
        p.error(f"the reference runs in {args.table1} trained {trained} steps, these ablations {args.steps}: "
                "pass the Table-1 results of the same budget as --table1")
    scored = sorted({r["test_tokens"] for r in reference if "test_tokens" in r})
    if any(n != args.test_tokens for n in scored):  # the test column compares like with like
        p.error(f"the reference runs in {args.table1} were tested on {scored} tokens per held-out document, "
                f"these ablations on {args.test_tokens}: pass --test-tokens {scored[0]}")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    for seed in [] if args.table_only else args.seeds:
        for name, overrides in rows_to_train.items():
            run_name = f"{slug(name)}-s{seed}"
            if (root / f"{run_name}.json").exists() or (args.only and slug(name) not in args.only):
                continue
            run = Path(args.runs) / run_name
            print(f"== {name} seed {seed}", flush=True)
            cfg = config("mac", seed, args.steps, run, args.data)
            cfg.model.update({**args.model_set, **overrides})
            try:
                s = train(cfg, log=lambda m: print(m, flush=True),
                          resume=True if list_checkpoints(run) else None)  # an interrupted run continues
            except TrainingDiverged as e:  # a result of the row, recorded; rerunning would repeat it
                record = {"seed": seed, "ablation": name, "steps": args.steps, "diverged_at_step": e.step,
                          "diverged": f"{e.quantity} {e.value}", "error": str(e), "run_dir": str(run)}
                (root / f"{run_name}.json").write_text(json.dumps(record, indent=1))
                print(f"   diverged: {e.quantity} {e.value} at step {e.step}", flush=True)
                continue
            stop_if_interrupted(s, run_name)
            model, tok = load(run)
            ppl = eval_ppl(model, tok, args.data, max_tokens=args.test_tokens, log=lambda *a: None)
            s["test_bpb"] = ppl[-1]["bpb"]
            s.update(seed=seed, ablation=name, test_tokens=args.test_tokens)
            (root / f"{run_name}.json").write_text(json.dumps(s, indent=1))
            print(f"   val {s['val_bpb']:.4f}  test {s['test_bpb']:.4f}", flush=True)
    files = {"MAC (reference, Table 1)": sorted(Path(args.table1).glob("mac-s*.json"))}
    for name in rows_to_train:
        files[name] = sorted(root.glob(f"{slug(name)}-s*.json"))
    rows = {name: [with_grad_stats(f) for f in fs] for name, fs in files.items()}
    text = table(rows)
    (root / "table.md").write_text(text)
    print(text)
    return 0


def grad_stats(metrics: Path) -> dict | None:
    """The outer gradient's norm before clipping over a run's logged steps (metrics.jsonl; a step
    logged twice, by a resumed run, counts once): median, max, and how many steps passed 10."""
    from titans.train import read_metrics

    if not metrics.exists():
        return None
    norms = {r["step"]: r["grad_norm"] for r in read_metrics(metrics) if "grad_norm" in r}
    if not norms:
        return None
    g = list(norms.values())
    return {"grad_norm_median": statistics.median(g), "grad_norm_max": max(g),
            "grad_norm_over_10": sum(x > 10 for x in g), "grad_norm_steps": len(g)}


def with_grad_stats(path: Path) -> dict:
    """A run's record, with its outer-gradient statistics added (and saved into the record) the first
    time its run folder's metrics are at hand; a record without them stays as it is."""
    r = json.loads(path.read_text())
    if "grad_norm_max" not in r and r.get("run_dir"):
        stats = grad_stats(Path(r["run_dir"]) / "metrics.jsonl")
        if stats:
            r.update(stats)
            path.write_text(json.dumps(r, indent=1))
    return r


def _grad_cell(rs: list[dict]) -> str:
    cells = [f"s{r['seed']}: {r['grad_norm_max']:.3g}, {r['grad_norm_over_10']} of {r['grad_norm_steps']}"
             for r in rs if "grad_norm_max" in r]
    return "; ".join(cells)


def table(rows: dict[str, list[dict]]) -> str:
    """The markdown table: mean ± sd over the finished seeds of each row; a seed whose training
    diverged counts in the seeds column and is named below the table, with the step it stopped at."""
    lines = ["| model | parameters | seeds | val bits/byte | held-out test bits/byte "
             "| outer gradient norm before clipping: max, steps above 10 |", "|---|---:|---:|---:|---:|---|"]
    notes = []
    for name, rs in rows.items():
        done = [r for r in rs if "diverged_at_step" not in r]
        for r in rs:
            if "diverged_at_step" in r:
                notes.append(f"- {name}, seed {r['seed']}: training diverged ({r['diverged']}) at step "
                             f"{r['diverged_at_step']} of {r['steps']}; not in the mean.")
        seeds = f"{len(done)}" + (f" (+{len(rs) - len(done)} diverged)" if len(done) < len(rs) else "")
        if done:
            val, test = _mean_sd([r["val_bpb"] for r in done]), _mean_sd([r["test_bpb"] for r in done])
            grads = _grad_cell(rs)
            lines.append(f"| {name} | {done[0]['parameters']:,} | {seeds} | {val} | {test} | {grads} |")
        elif rs:
            lines.append(f"| {name} | | {seeds} | diverged | diverged | {_grad_cell(rs)} |")
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


if __name__ == "__main__":
    sys.exit(main())
