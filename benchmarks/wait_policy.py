"""How OpenMP's wait policy changes a two-thread run when the CPU is shared.

PyTorch's CPU kernels run on OpenMP threads. By default (OMP_WAIT_POLICY unset) a thread that waits
for the others at the end of a parallel region spins for a while before it sleeps. When another
process holds one of the cores, the spinning thread takes CPU time from the thread it waits for,
and every one of the thousands of small parallel regions in a memory step pays for it.
`OMP_WAIT_POLICY=PASSIVE` makes waiting threads sleep at once.

This script times forward + backward of the benchmark NeuralMemory (issue 2's settings: dim 384,
4 heads, depth 2, expansion 4, chunk 64, batch 2) in fresh processes, with the policy unset and
PASSIVE and one thread alternating, on an otherwise idle machine and next to one busy single-thread
process (the same step in a loop, standing in for a training run on the other core).

    python benchmarks/wait_policy.py --T 1024 --repeats 3 --out benchmarks/results/wait_policy
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# the timed settings: name -> (threads, OMP_WAIT_POLICY); "threads" None means --threads
SETTINGS = {"unset": (None, None), "PASSIVE": (None, "PASSIVE"), "1 thread": (1, None)}
# the other process: the same memory step on one thread, in a loop (a training run on the other core)
BUSY = ("import torch\ntorch.set_num_threads(1)\nfrom titans.memory import NeuralMemory\n"
        "m = NeuralMemory(384, 4, depth=2, expansion=4, chunk_size=64)\nx = torch.randn(2, 512, 384)\n"
        "while True:\n    m(x)[0].square().mean().backward()\n")


def worker(T: int, steps: int) -> dict:
    import torch

    from titans.memory import NeuralMemory

    torch.manual_seed(0)
    module = NeuralMemory(384, 4, depth=2, expansion=4, chunk_size=64)
    x = torch.randn(2, T, 384)

    def step():
        module.zero_grad(set_to_none=True)
        module(x)[0].square().mean().backward()

    step()  # warm-up: thread pool, allocator
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"threads": torch.get_num_threads(), "policy": os.environ.get("OMP_WAIT_POLICY"),
            "seconds": statistics.median(times), "times": times}


def run_worker(T: int, steps: int, threads: int, policy: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = str(threads)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, __file__, "--worker", "--T", str(T), "--steps", str(steps)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"worker failed: {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(T: int, steps: int, threads: int, repeats: int, busy: bool) -> dict:
    other = subprocess.Popen([sys.executable, "-c", BUSY], env={**os.environ, "OMP_NUM_THREADS": "1"}) \
        if busy else None
    try:
        if other is not None:
            time.sleep(5)  # let it get going
        runs: dict[str, list[float]] = {name: [] for name in SETTINGS}
        names = list(SETTINGS)
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                n, policy = SETTINGS[name]
                res = run_worker(T, steps, n or threads, policy)
                runs[name].append(res["seconds"])
                print(f"  T={T} {'busy' if busy else 'idle'} {name:8s} run {r + 1}: {res['seconds']:.3f} s",
                      flush=True)
    finally:
        if other is not None:
            other.kill()
            other.wait()
    return {"T": T, "threads": threads, "other_process": busy,
            "seconds": {name: statistics.median(v) for name, v in runs.items()}, "runs": runs}


def table(rows: list[dict]) -> str:
    lines = ["| T | threads | other core | OMP_WAIT_POLICY unset s | PASSIVE s | unset / PASSIVE "
             "| one thread s |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['T']} | {r['threads']} | {'one busy process' if r['other_process'] else 'idle'} "
                     f"| {s['unset']:.3f} | {s['PASSIVE']:.3f} | {s['unset'] / s['PASSIVE']:.2f}x "
                     f"| {s['1 thread']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=1024, help="sequence length")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (median)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the timed processes")
    p.add_argument("--repeats", type=int, default=3, help="processes per policy and load (median)")
    p.add_argument("--loads", default="idle,busy", help="comma-separated: idle, busy")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.T, args.steps)))
        return
    loads = args.loads.split(",")
    if args.T < 1 or args.steps < 1 or args.threads < 1 or args.repeats < 1:
        p.error("--T, --steps, --threads and --repeats must be at least 1")
    if not loads or any(x not in ("idle", "busy") for x in loads):
        p.error(f"--loads takes idle and/or busy, got {args.loads!r}")
    rows = [measure(args.T, args.steps, args.threads, args.repeats, load == "busy") for load in loads]
    print(table(rows), end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
        Path(args.out + ".md").write_text(table(rows))


if __name__ == "__main__":
    main()
