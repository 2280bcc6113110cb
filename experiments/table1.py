"""Table-1 analog at CPU scale: validation and held-out bits per byte of every variant at equal
parameter count (the `tiny` preset, ~2M, SwiGLU width solved per variant) and an equal token budget,
over several seeds.

    python experiments/table1.py --steps 200 --seeds 0,1          # ~0.4M tokens per run
    python experiments/table1.py --table-only                     # rebuild the table from finished runs
    python experiments/table1.py --variants lmm,mag,mal --seeds 0 --set forget_to=init \
        --out results/table1_forget_to_init --runs out/table1_forget_to_init   # a config variation

Runs are resumable: a run whose result file exists is not trained again, and one cut short continues
from its last checkpoint (every quarter of the steps; resuming is bit-for-bit, tests/test_train.py).
Checkpoints go to out/table1/RUN/ (not committed; every one is reproduced by this command), the
numbers to results/table1/ (RUN.json per run, runs.jsonl, table.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

VARIANTS = ("transformer", "swa", "gated_deltanet", "ttt_mlp", "lmm", "mac", "mag", "mal")


def config(variant: str, seed: int, steps: int, out: Path, data: str):
    from titans.train import config_from_dict

    return config_from_dict({
        "model": {"preset": "tiny", "variant": variant},
        "data": {"dir": data, "sources": "pypi", "tokenizer": "byte", "seq_len": 256},
        "optim": {"lr": 3e-3, "warmup_steps": max(1, steps // 10)},
        "train": {"steps": steps, "batch_size": 8, "seed": seed, "eval_every": steps, "eval_windows": 128,
                  "ckpt_every": max(1, steps // 4), "keep_last": 1, "out": str(out), "tensorboard": False,
                  "progress": False, "log_every": 50},
    }, source="table1")


def run_all(args) -> None:
    from titans.checkpoint import list_checkpoints, load
    from titans.evaluate import eval_ppl
    from titans.train import stop_if_interrupted, train

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for variant in args.variants:
            name = f"{variant}-s{seed}"
            run = Path(args.runs) / name
            if (root / f"{name}.json").exists():
                continue
            print(f"== {variant} seed {seed}", flush=True)
            cfg = config(variant, seed, args.steps, run, args.data)
            cfg.model.update(args.model_set)
            s = train(cfg, log=lambda m: print(m, flush=True),
                      resume=True if list_checkpoints(run) else None)  # an interrupted run continues
            stop_if_interrupted(s, name)
            model, tok = load(run)
            t0 = time.perf_counter()
            ppl = eval_ppl(model, tok, args.data, max_tokens=args.test_tokens, log=lambda *a: None)
            s["test_bpb"] = ppl[-1]["bpb"]
            s["test_seconds"] = time.perf_counter() - t0
            s["test_tokens"] = args.test_tokens  # per held-out document: compare tables at equal values
            s["seed"] = seed
            (root / f"{name}.json").write_text(json.dumps(s, indent=1))
            print(f"   val {s['val_bpb']:.4f}  test {s['test_bpb']:.4f}  ({s['seconds']:.0f} s)", flush=True)
            table(args)


def add_model_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="model_set", action="append", default=[], metavar="FIELD=VALUE",
                   help="TitansConfig override for every run (e.g. forget_to=init); use its own --out/--runs")


def parse_model_set(p: argparse.ArgumentParser, items: list[str]) -> dict:
    """`["forget_to=init", "conv=false"]` -> `{"forget_to": "init", "conv": False}` (values read as YAML)."""
    pairs = [item.partition("=") for item in items]
    if any(not eq or not key for key, eq, _ in pairs):
        p.error(f"--set expects FIELD=VALUE, got {items}")
    return {key: yaml.safe_load(value) for key, _, value in pairs}


def _mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def table(args) -> str:
    root = Path(args.out)
    rows = [json.loads(p.read_text()) for p in sorted(root.glob("*-s*.json"))]
    lines = ["| variant | parameters | seeds | tokens/run | val bits/byte (mean ± sd) "
             "| held-out test bits/byte (mean ± sd) |", "|---|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        rs = [r for r in rows if r["variant"] == v]
        if not rs:
            continue
        lines.append(f"| {v} | {rs[0]['parameters']:,} | {len(rs)} | {rs[0]['tokens']:,} "
                     f"| {_mean_sd([r['val_bpb'] for r in rs])} | {_mean_sd([r['test_bpb'] for r in rs])} |")
    text = "\n".join(lines) + "\n"
    (root / "table.md").write_text(text)
    with open(root / "runs.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    p.add_argument("--data", default="data")
    p.add_argument("--test-tokens", type=int, default=32768, help="tokens per held-out document scored")
    p.add_argument("--out", default="results/table1")
    p.add_argument("--runs", default="out/table1")
    p.add_argument("--table-only", action="store_true")
    add_model_set(p)
    args = p.parse_args()
    args.model_set = parse_model_set(p, args.model_set)
    if not args.table_only:
        run_all(args)
    print(table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
