"""How fast the memory layer's matrix products alone run: the floor under its step time.

Records every matrix product (bmm, baddbmm, mm, addmm) of one NeuralMemory forward + backward at the
issue-2 settings (dim 384, 4 heads, 2-layer memory, expansion 4, chunk 64, batch 2) with their shapes,
then replays the same products, same shapes and counts, on fresh contiguous tensors with nothing in
between, and compares:
  - the step's time with the products' time alone (the rest is elementwise work, Python and dispatch),
  - the products' FLOP rate with a plain 2048 x 2048 fp32 matmul's (small products run slower),
all in one process. "% of matmul rate" in memory_speed.py cannot exceed the products-alone rate.

    python benchmarks/gemm_floor.py --T 4096                     # threads as OMP_NUM_THREADS says
    python benchmarks/gemm_floor.py --T 4096 --out benchmarks/results/gemm_floor
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

from memory_speed import build, matmul_rate, step

PRODUCTS = ("aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::mm", "aten::addmm", "aten::addmm_")


def warmed_up(T: int):
    """(module, x): the benchmark's memory layer after one warm-up step, and an input of length T."""
    import torch

    torch.manual_seed(0)
    module = build("titans")
    step(module, torch.randn(2, 256, 384))
    return module, torch.randn(2, T, 384, requires_grad=True)


def record_products(module, x) -> Counter:
    """(op name, input shapes) -> count, for the matrix products of one step of module on x, with the
    eager chunk loops (batched products; the C++ loops run the same products per memory, mostly on
    worker threads, which the profiler does not record)."""
    from torch.profiler import ProfilerActivity, profile

    from titans.memory import chunks_native, native_chunks

    was_native = chunks_native()
    native_chunks(False)
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step(module, x)
    finally:
        native_chunks(was_native)
    counts: Counter = Counter()
    for e in prof.events():
        parent = e.cpu_parent
        if e.name in PRODUCTS and not (parent is not None and parent.name in PRODUCTS):
            counts[(e.name, tuple(tuple(s) for s in e.input_shapes[:3]))] += 1
    return counts


def product_flops(name: str, shapes) -> int:
    a, b = (shapes[1], shapes[2]) if "add" in name else (shapes[0], shapes[1])
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def replay(counts: Counter, rounds: int = 3) -> list[float]:
    """Seconds for all recorded products, run back to back; one value per round."""
    import torch

    jobs = []
    for (name, shapes), n in counts.items():
        if "add" in name:
            c, a, b = (torch.randn(*s) for s in shapes)
            fn = {"aten::baddbmm": lambda c=c, a=a, b=b: torch.baddbmm(c, a, b, alpha=-1),
                  "aten::baddbmm_": lambda c=c, a=a, b=b: c.baddbmm_(a, b),
                  "aten::addmm": lambda c=c, a=a, b=b: torch.addmm(c, a, b),
                  "aten::addmm_": lambda c=c, a=a, b=b: c.addmm_(a, b)}[name]
        else:
            a, b = (torch.randn(*s) for s in shapes[:2])
            op = torch.bmm if name == "aten::bmm" else torch.mm
            fn = lambda a=a, b=b, op=op: op(a, b)  # noqa: E731
        fn()
        jobs.append((fn, n))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for fn, n in jobs:
            for _ in range(n):
                fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--steps", type=int, default=3, help="timed full steps; median reported (default 3)")
    p.add_argument("--out", help="also write OUT.json and OUT.md")
    args = p.parse_args()
    if args.T < 64 or args.steps < 1:
        p.error("--T must be at least 64 and --steps at least 1")

    module, x = warmed_up(args.T)
    counts = record_products(module, x)
    flops = sum(product_flops(name, shapes) * n for (name, shapes), n in counts.items())
    from titans.memory import native_chunks

    step_times, eager_times = [], []
    for _ in range(args.steps):  # the default (C++ loops on the CPU) and the eager loops, alternating
        for native, times in ((True, step_times), (False, eager_times)):
            native_chunks(native)
            module.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step(module, x)
            times.append(time.perf_counter() - t0)
    native_chunks(True)
    product_times = replay(counts)
    rate = matmul_rate()
    t_step, t_prod = statistics.median(step_times), statistics.median(product_times)
    t_eager = statistics.median(eager_times)
    result = {
        "T": args.T,
        "threads": torch.get_num_threads(),
        "products": sum(counts.values()),
        "distinct_shapes": len(counts),
        "gflop": flops / 1e9,
        "step_seconds": step_times,
        "eager_step_seconds": eager_times,
        "products_seconds": product_times,
        "matmul_gflops": rate,
    }
    lines = [
        f"T = {args.T}, {result['threads']} thread(s); {result['products']} matrix products of "
        f"{result['distinct_shapes']} shapes, {flops / 1e9:.0f} GFLOP per step",
        "",
        "| what | seconds | GFLOP/s | % of the 2048^2 matmul rate |",
        "|---|---:|---:|---:|",
        f"| the whole step (median of {args.steps}) | {t_step:.3f} | {flops / t_step / 1e9:.0f} "
        f"| {flops / t_step / 1e9 / rate:.0%} |",
        f"| the whole step, eager chunk loops (median of {args.steps}) | {t_eager:.3f} "
        f"| {flops / t_eager / 1e9:.0f} | {flops / t_eager / 1e9 / rate:.0%} |",
        f"| its matrix products alone (median of 3 replays) | {t_prod:.3f} | {flops / t_prod / 1e9:.0f} "
        f"| {flops / t_prod / 1e9 / rate:.0%} |",
        f"| plain 2048 x 2048 fp32 matmul | | {rate:.0f} | 100% |",
        "",
        f"products alone / whole step: {t_prod / t_step:.0%} (eager chunk loops: {t_prod / t_eager:.0%})",
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
