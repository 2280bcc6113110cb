"""A/B speed of the memory layer: this working tree against another revision, in one run.

On a shared, noisy machine a speed change is only believable as a ratio against a baseline measured
in the same run. This script checks out `--base` (any git revision) into a temporary worktree and
times NeuralMemory's forward + backward at the settings of `memory_speed.py` (dim 384, 4 heads,
2-layer memory, expansion 4, chunk 64, batch 2) with the two versions of the code in alternating
processes. Each process warms up, then times `--steps` steps; the report gives, per length, the
median step of each side over all its processes, their ratio, and every process's median, so the
spread is visible next to the ratio.

    python benchmarks/memory_ab.py --base HEAD~1                      # T = 4096, one thread
    python benchmarks/memory_ab.py --base abc1234 --lengths 1024,16384 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memory_speed import BATCH, CHUNK, DEPTH, DIM, EXPANSION, HEADS, build, step  # the same settings and step

ROOT = Path(__file__).resolve().parents[1]


def worker(T: int, steps: int) -> dict:
    """Time `steps` forward + backward steps of NeuralMemory at length T (after one warm-up step)
    with whichever `titans` this interpreter imports."""
    import torch

    import titans

    torch.manual_seed(0)
    module = build("titans")  # imports titans.memory from this interpreter's path: base or head
    x = torch.randn(BATCH, T, DIM)
    step(module, x)  # warm-up: thread pools, allocator
    wall, cpu = [], []
    for _ in range(steps):
        module.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.process_time()
        step(module, x)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"T": T, "wall_s": wall, "cpu_s": cpu, "titans_file": titans.__file__,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def run_worker(code_root: Path, T: int, steps: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": str(threads),
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--worker", "--lengths", str(T), "--steps", str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=code_root)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        raise SystemExit(f"memory_ab: the worker for {code_root} failed at T={T}: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def resolve(rev: str) -> str:
    done = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True,
                          text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"memory_ab: --base {rev!r} is not a revision of the repository at {ROOT} "
                         f"(git says: {done.stderr.strip() or done.stdout.strip()})")
    return done.stdout.strip()


def compare(base: Path, head: Path, lengths: list[int], repeats: int, steps: int, threads: int,
            log=print) -> list[dict]:
    """Alternate base and head processes `repeats` times per length; one row per length."""
    rows = []
    for T in lengths:
        runs = {"base": [], "head": []}
        for r in range(repeats):
            for side in ("base", "head") if r % 2 == 0 else ("head", "base"):
                res = run_worker(base if side == "base" else head, T, steps, threads)
                runs[side].append(res)
                log(f"  T={T:6d} {side} run {r + 1}: median step {statistics.median(res['wall_s']):.3f} s "
                    f"(cpu {statistics.median(res['cpu_s']):.3f} s), peak {res['peak_rss_gb']:.2f} GB")
        row = {"T": T}
        for side, rs in runs.items():
            row[side] = {
                "median_wall_s": statistics.median(s for r in rs for s in r["wall_s"]),
                "median_cpu_s": statistics.median(s for r in rs for s in r["cpu_s"]),
                "process_medians_wall_s": [statistics.median(r["wall_s"]) for r in rs],
                "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in rs),
                "titans_file": rs[0]["titans_file"],
            }
        row["ratio_wall"] = row["head"]["median_wall_s"] / row["base"]["median_wall_s"]
        row["ratio_cpu"] = row["head"]["median_cpu_s"] / row["base"]["median_cpu_s"]
        rows.append(row)
    return rows


def table(rows: list[dict], base_rev: str, repeats: int, steps: int, threads: int) -> str:
    lines = [
        f"base: {base_rev[:10]}; head: the working tree; {repeats} processes per side, alternating, "
        f"{steps} timed steps each, {threads} thread(s); batch {BATCH}, dim {DIM}, {HEADS} heads, depth "
        f"{DEPTH}, expansion {EXPANSION}, chunk {CHUNK}",
        "",
        "| T | base s | head s | head / base (wall) | head / base (cpu) | base per process "
        "| head per process | base GB | head GB |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in rows:
        b, h = r["base"], r["head"]
        per = lambda d: " ".join(f"{s:.3f}" for s in d["process_medians_wall_s"])  # noqa: E731
        lines.append(f"| {r['T']} | {b['median_wall_s']:.3f} | {h['median_wall_s']:.3f} "
                     f"| {r['ratio_wall']:.3f} | {r['ratio_cpu']:.3f} | {per(b)} | {per(h)} "
                     f"| {b['peak_rss_gb']:.2f} | {h['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD", help="git revision to compare against (default: HEAD)")
    p.add_argument("--lengths", default="4096", help="comma-separated sequence lengths (default: 4096)")
    p.add_argument("--repeats", type=int, default=3, help="processes per side and length (default: 3)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the workers (default: 1)")
    p.add_argument("--out", help="also write the table (.md) and the numbers (.json) to this path prefix")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        lengths = [int(t) for t in args.lengths.split(",")]
    except ValueError:
        p.error(f"--lengths: expected comma-separated integers, got {args.lengths!r}")
    if any(t < 1 for t in lengths) or args.repeats < 1 or args.steps < 1 or args.threads < 1:
        p.error("--lengths, --repeats, --steps and --threads must all be at least 1")
    if args.worker:
        print(json.dumps(worker(lengths[0], args.steps)))
        return

    rev = resolve(args.base)
    with tempfile.TemporaryDirectory(prefix="memory_ab_") as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), rev], check=True, cwd=ROOT)
        try:
            print(f"base {rev[:10]} checked out at {tree}", flush=True)
            rows = compare(tree, ROOT, lengths, args.repeats, args.steps, args.threads,
                           log=lambda s: print(s, flush=True))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    text = table(rows, rev, args.repeats, args.steps, args.threads)
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps({"base": rev, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
