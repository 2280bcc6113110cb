"""Memory step time when the momentum gate eta is small, with and without flushing tiny chunk coefficients.

The chunk coefficients are products of up to b gates (eta^64 at eta = 0.2 is 2e-45): they pass
through float32's subnormal range, and so do their products with keys and errors inside the chunk's
matrix products, which then run several times slower on x86 CPUs. `chunked._flush_subnormal` sets
every coefficient below sqrt(finfo.tiny) to zero. This script times NeuralMemory's forward +
backward at the issue-2 settings (benchmarks/memory_speed.py: dim 384, 4 heads, 2-layer memory,
expansion 4, chunk 64, batch 2) with every eta set near each --etas value (gate bias logit(eta),
gate weights scaled by 0.01), with the flush ("flush") and with it replaced by the identity
("no flush", the code before 2026-12-07), in one process, alternating, median of --steps steps each.

    python benchmarks/subnormal_gates.py                          # T = 1024, threads as OMP_NUM_THREADS says
    python benchmarks/subnormal_gates.py --T 4096 --out benchmarks/results/subnormal_gates
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from memory_speed import build, step

MODES = ("flush", "no flush")


def with_eta(module, eta: float):
    """module with every momentum gate near eta (bias logit(eta), gate weights scaled down 100x)."""
    import torch

    names = module.gate_names
    with torch.no_grad():
        module.gates.bias.view(len(names), -1)[names.index("eta")] = math.log(eta / (1 - eta))
        module.gates.weight.mul_(0.01)
    return module


def time_steps(module, x, mode: str, steps: int) -> list[float]:
    from titans.memory import chunked

    flush = chunked._flush_subnormal
    if mode == "no flush":
        chunked._flush_subnormal = lambda t: t
    try:
        times = []
        for _ in range(steps):
            module.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step(module, x)
            times.append(time.perf_counter() - t0)
        return times
    finally:
        chunked._flush_subnormal = flush


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=1024, help="sequence length (default 1024)")
    p.add_argument("--etas", default="0.73,0.2,0.1",
                   help="momentum gate values, comma-separated (default 0.73 (the initial gate),0.2,0.1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode and eta (default 3)")
    p.add_argument("--out", help="also write OUT.json and OUT.md")
    args = p.parse_args()
    etas = [float(e) for e in args.etas.split(",")]
    if args.T < 64 or args.steps < 1 or not all(0 < e < 1 for e in etas):
        p.error("--T must be at least 64, --steps at least 1, and every eta in (0, 1)")

    torch.manual_seed(0)
    x = torch.randn(2, args.T, 384, requires_grad=True)
    rows = []
    for eta in etas:
        torch.manual_seed(0)
        module = with_eta(build("titans"), eta)
        step(module, x[:, :256])  # warm-up
        times = {mode: [] for mode in MODES}
        for _ in range(args.steps):  # alternating, one step of each at a time
            for mode in MODES:
                times[mode] += time_steps(module, x, mode, 1)
        med = {mode: statistics.median(ts) for mode, ts in times.items()}
        rows.append({"eta": eta, "seconds": times, "median": med})
        print(f"eta {eta}: flush {med['flush']:.3f} s, no flush {med['no flush']:.3f} s", flush=True)

    base = rows[0]["median"]["flush"]
    lines = [
        f"T = {args.T}, {torch.get_num_threads()} thread(s), median of {args.steps} steps each "
        "(forward + backward), both modes alternating in one process",
        "",
        f"| eta | flush (s) | no flush (s) | no flush / flush | flush / (eta = {etas[0]}, flush) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f, n = r["median"]["flush"], r["median"]["no flush"]
        lines.append(f"| {r['eta']} | {f:.3f} | {n:.3f} | {n / f:.2f}x | {f / base:.2f}x |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps({"T": args.T, "threads": torch.get_num_threads(),
                                                        "rows": rows}, indent=1))
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
