"""Table-2 analog at CPU scale: S-NIAH-1/2/3 accuracy at 1x, 4x, 16x and 64x the training length, for
models fine-tuned on needle tasks at the training length (<= 2K tokens).

Each model starts from its Table-1 checkpoint (experiments/table1.py, same variant and seed),
is fine-tuned on generated needle examples from the *train* split (data.tasks, answer tokens
scored), then evaluated on needles hidden in the held-out books, streamed on its state:

    python experiments/table2.py --variants mac,transformer,swa,gated_deltanet --seeds 0 \
        --seq-len 1024 --steps 300 --lengths 1k,4k,16k,64k --examples 10

The BABILong analog is the same pipeline with `--suite babilong` (fine-tune on generated bAbI
QA1-QA5 examples, evaluate QA1-QA5 at each length); its defaults are out/babilong and results/babilong:

    python experiments/table2.py --suite babilong --variants mac --seq-len 1024 --bptt 0 \
        --set model.forget_to=init --table1-runs out/table1_forget_to_init --lengths 1k,4k,16k,64k \
        --eval-batch 10        # the run in docs/results.md (the Table-1 runs trained with forget_to=init)

Resumable like table1.py. Checkpoints in out/table2/, numbers in results/table2/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

SUITES = {"niah": "niah_single_1,niah_single_2,niah_single_3",
          "babilong": ",".join(f"babilong_qa{qa}" for qa in range(1, 6))}


def config(variant: str, seed: int, args, out: Path):
    from titans.train import apply_overrides, config_from_dict

    cfg = config_from_dict({
        "model": {"preset": "tiny", "variant": variant},
        "data": {"dir": args.data, "sources": "pypi", "tokenizer": "byte", "seq_len": args.seq_len,
                 "tasks": SUITES[args.suite], "task_mix": args.task_mix, "task_loss": "answer"},
        "optim": {"lr": args.lr, "warmup_steps": max(1, args.steps // 10)},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "seed": seed, "eval_every": args.steps,
                  "bptt": args.bptt, "max_minutes": args.max_minutes, "device": args.device,
                  "compile": args.compile, "cuda_graphs": args.cuda_graphs,
                  "eval_windows": 16, "ckpt_every": args.steps, "keep_last": 1, "out": str(out),
                  "tensorboard": False, "progress": False, "log_every": 25,
                  "init_from": str(Path(args.table1_runs) / f"{variant}-s{seed}")},
    }, source="table2")
    return apply_overrides(cfg, args.overrides)


def main() -> int:
    from titans.checkpoint import list_checkpoints
    from titans.evaluate import evaluate, parse_lengths
    from titans.train import stop_if_interrupted, train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="niah",
                   help="needle tasks (Table 2) or bAbI QA1-QA5 in books (BABILong)")
    p.add_argument("--variants", type=lambda s: s.split(","), default=["mac", "transformer", "swa",
                                                                      "gated_deltanet"])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--task-mix", type=float, default=1.0,
                   help="share of each batch that is task rows (data.task_mix); the rest is plain text, "
                        "which keeps the language model (with 1.0 only answer tokens are scored, and the "
                        "BABILong fine-tune's validation went from 3.4 to 9.3 bits/byte)")
    p.add_argument("--bptt", type=int, default=256,
                   help="truncated backprop in pieces of this many tokens (0: full); full backprop through "
                        "the deep memory explodes beyond ~512 tokens (docs/training.md)")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop each fine-tune after this many minutes, with a checkpoint (0: no limit)")
    p.add_argument("--device", default="auto", help="training and evaluation device: auto, cpu, cuda")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the memory's chunk step for training (train.compile; about a minute "
                        "to compile, then ~4x faster memory on an H100)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="run the memory's chunk loops as CUDA graphs, for training and evaluation "
                        "(train.cuda_graphs; 4-8x faster memory on an H200, same results)")
    p.add_argument("--lengths", default="1k,4k,16k,64k")
    p.add_argument("--examples", type=int, default=10)
    p.add_argument("--eval-batch", type=int, default=1,
                   help="examples evaluated side by side (titans eval --batch-size; shorter prompts get up "
                        "to 32 leading document separators)")
    p.add_argument("--data", default="data")
    p.add_argument("--table1-runs", default="out/table1")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer config override for every fine-tune (e.g. model.forget_to=init, to match "
                        "--table1-runs trained with that option)")
    p.add_argument("--runs", default=None, help="run folders (default out/table2 or out/babilong)")
    p.add_argument("--out", default=None, help="results (default results/table2 or results/babilong)")
    args = p.parse_args()
    default = "table2" if args.suite == "niah" else "babilong"
    args.runs = args.runs or f"out/{default}"
    args.out = args.out or f"results/{default}"
    tasks = SUITES[args.suite]
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    lengths = parse_lengths(args.lengths)
    for seed in args.seeds:
        for variant in args.variants:
            name = f"{variant}-s{seed}"
            if (root / f"{name}.json").exists():
                continue
            run = Path(args.runs) / name
            print(f"== {name}: fine-tune on {tasks} at {args.seq_len} tokens", flush=True)
            summary = train(config(variant, seed, args, run), log=lambda m: print(m, flush=True),
                            resume=True if list_checkpoints(run) else None)  # an interrupted run continues
            stop_if_interrupted(summary, name)
            result = evaluate(run, [args.suite], lengths, data_dir=args.data, n_examples=args.examples,
                              seed=1000 + seed, out_dir=run / "eval", command="experiments/table2.py",
                              device=args.device, batch_size=args.eval_batch, cuda_graphs=args.cuda_graphs,
                              log=lambda m: print(m, flush=True))
            (root / f"{name}.json").write_text(json.dumps({"variant": variant, "seed": seed, "train": summary,
                                                           "fit": fit_stats(run), "rows": result["rows"]},
                                                          indent=1))
    print(table(root, lengths, tasks.split(",")))
    return 0


def fit_stats(run: Path, last: int = 50) -> dict:
    """How the fine-tune went, from the run's metrics.jsonl (the whole history, so a resumed run
    reports all of it): steps, tokens, the last logged tokens/s, the mean answer-token loss of the
    first and the last `last` steps, and the largest gradient norm (before clipping)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = {r["step"]: r for r in rows if "loss" in r}  # the last record of a step wins (resume)
    if not steps:
        return {}
    losses = [steps[k]["loss"] for k in sorted(steps)]
    end = steps[max(steps)]
    return {"steps": max(steps), "tokens": end["tokens"], "tok_per_s": end["tok_per_s"],
            f"loss_first_{last}": statistics.mean(losses[:last]),
            f"loss_last_{last}": statistics.mean(losses[-last:]),
            "max_grad_norm": max(r["grad_norm"] for r in steps.values())}


def table(root: Path, lengths: list[int], tasks: list[str]) -> str:
    from titans.evaluate import length_label

    runs = [json.loads(p.read_text()) for p in sorted(root.glob("*-s*.json"))]
    lines = ["| variant | task | " + " | ".join(length_label(n) for n in lengths) + " |",
             "|---|---|" + "---:|" * len(lengths)]
    for variant in dict.fromkeys(r["variant"] for r in runs):
        for task in tasks:
            cells = []
            for n in lengths:
                accs = [row["accuracy"] for r in runs if r["variant"] == variant for row in r["rows"]
                        if row["task"] == task and row["length"] == n]
                cells.append(f"{100 * statistics.mean(accs):.0f}%" if accs else "")
            lines.append(f"| {variant} | {task} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (root / "table.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
