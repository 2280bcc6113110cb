"""Forward + backward speed and peak memory of NeuralMemory vs titans-pytorch's NeuralMemory.

Settings (issue 2): dim 384, 4 heads of 96, 2-layer memory MLP with expansion 4, chunk 64,
batch 2, T in {1024, 4096, 16384}. Every measurement runs in its own process (peak RSS is the
process's), the two implementations alternate, and the median of --repeats runs is reported.
Also reports matmul FLOPs (torch.utils.flop_counter; convolutions left out, as the counter prices
a depthwise convolution as a dense one) / time as a fraction of a plain fp32 matmul's rate measured
in the same run.

    python benchmarks/memory_speed.py                  # both implementations (needs the bench extra)
    python benchmarks/memory_speed.py --impls titans   # ours only
    python benchmarks/memory_speed.py --impls titans,titans-compiled,titans-pytorch \
        --out benchmarks/results/memory_speed_compiled   # also with the compiled chunk step
    python benchmarks/memory_speed.py --impls titans,titans-eager,titans-pytorch   # and the eager loops

"titans" is the layer as it runs by default: on the CPU its chunk loops are C++ (titans/memory/native.py);
"titans-eager" runs them as eager PyTorch. The FLOP count runs the eager loops under either (a dispatch
mode does not reach the C++ loops' worker threads); both do the same products.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DIM, HEADS, DEPTH, EXPANSION, CHUNK, BATCH = 384, 4, 2, 4, 64, 2


def build(impl: str):
    if impl in ("titans", "titans-compiled", "titans-eager"):
        from titans.memory import NeuralMemory

        return NeuralMemory(DIM, HEADS, depth=DEPTH, expansion=EXPANSION, chunk_size=CHUNK)
    if impl == "titans-pytorch":
        from titans_pytorch import NeuralMemory

        return NeuralMemory(
            DIM,
            chunk_size=CHUNK,
            dim_head=DIM // HEADS,
            heads=HEADS,
            default_model_kwargs=dict(depth=DEPTH, expansion_factor=float(EXPANSION)),
        )
    raise ValueError(f"unknown implementation {impl!r}; expected titans or titans-pytorch")


def step(module, x):
    out = module(x)[0]
    out.float().square().mean().backward()


def worker(impl: str, T: int, count_flops: bool) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    module = build(impl)
    if impl == "titans-eager":  # the chunk loops as eager PyTorch, not the default C++ ones on the CPU
        from titans.memory import native_chunks

        native_chunks(False)
    if impl == "titans-compiled":  # the chunk step through torch.compile; its shapes do not depend on T,
        from titans.memory import compile_chunks  # so the warm-up below compiles it once

        compile_chunks()
    step(module, torch.randn(BATCH, 256, DIM))  # warm-up: thread pools, allocator (and compiling)
    module.zero_grad(set_to_none=True)
    x = torch.randn(BATCH, T, DIM, requires_grad=True)
    t0 = time.perf_counter()
    step(module, x)
    seconds = time.perf_counter() - t0
    result = {
        "impl": impl,
        "T": T,
        "seconds": seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }
    if count_flops:
        with FlopCounterMode(display=False, custom_mapping=in_place_products()) as counter:
            step(module, x)
        counts = counter.get_flop_counts()["Global"]
        # the counter prices a depthwise convolution's backward as a dense one (groups ignored):
        # count matrix products only
        result["flops"] = sum(v for op, v in counts.items() if "conv" not in str(op))
    return result


def in_place_products() -> dict:
    """FLOP formulas for the in-place matrix products, which torch.utils.flop_counter leaves
    uncounted (it knows baddbmm and addmm, not baddbmm_ and addmm_); the memory's chunk step
    accumulates into its buffers with them."""
    import torch
    from torch.utils.flop_counter import flop_registry

    aten, mapping = torch.ops.aten, {}
    for in_place, functional in ((aten.baddbmm_, aten.baddbmm), (aten.addmm_, aten.addmm)):
        count = lambda *args, formula=flop_registry[functional], **kwargs: formula(*args, **kwargs)  # noqa: E731
        count._get_raw = True  # already takes tensors (the registry's formulas are wrapped)
        mapping[in_place] = count
    return mapping


def matmul_rate(n: int = 2048, reps: int = 7) -> float:
    """GFLOP/s of a plain fp32 n x n matmul on this machine (median)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def run_worker(impl: str, T: int, count_flops: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--T", str(T)] + (["--flops"] if count_flops else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        return {
            "impl": impl,
            "T": T,
            "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed",
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,4096,16384", help="comma-separated sequence lengths")
    p.add_argument("--impls", default="titans,titans-pytorch", help="comma-separated implementations")
    p.add_argument("--repeats", type=int, default=3, help="measurements per (impl, T); median reported")
    p.add_argument("--out", default="benchmarks/results/memory_speed", help="results path prefix (.json/.md)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    p.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.T, args.flops)))
        return

    lengths = [int(t) for t in args.lengths.split(",")]
    impls = args.impls.split(",")
    rate = matmul_rate()
    print(f"fp32 matmul rate (2048^3, median of 7): {rate:.1f} GFLOP/s", flush=True)
    runs: dict[tuple[str, int], list[dict]] = {}
    flops: dict[int, float] = {}
    for T in lengths:
        for r in range(args.repeats):
            for impl in impls if r % 2 == 0 else impls[::-1]:  # alternate the order
                res = run_worker(impl, T)
                runs.setdefault((impl, T), []).append(res)
                shown = (
                    f"{res['seconds']:.3f} s, {res['peak_rss_gb']:.2f} GB"
                    if "error" not in res
                    else res["error"]
                )
                print(f"  T={T:6d} {impl:15s} run {r + 1}: {shown}", flush=True)
        if "titans" in impls:
            flops[T] = run_worker("titans", T, count_flops=True).get("flops", float("nan"))

    rows, summary = [], []
    for T in lengths:
        row = {"T": T}
        for impl in impls:
            ok = [x for x in runs[(impl, T)] if "error" not in x]
            if not ok:
                row[impl] = {"error": runs[(impl, T)][0]["error"]}
                continue
            row[impl] = {
                "seconds": statistics.median(x["seconds"] for x in ok),
                "peak_rss_gb": statistics.median(x["peak_rss_gb"] for x in ok),
                "per_token_us": statistics.median(x["seconds"] for x in ok) / (BATCH * T) * 1e6,
            }
        if "titans" in row and "seconds" in row["titans"]:
            achieved = flops[T] / row["titans"]["seconds"] / 1e9
            row["titans"].update(gflop=flops[T] / 1e9, gflops=achieved, matmul_fraction=achieved / rate)
        rows.append(row)

    ours_impls = [i for i in impls if i != "titans-pytorch"]
    for ours_impl in ours_impls:
        if len(ours_impls) > 1:  # one table per implementation of ours: name each
            summary.append(f"\n**{ours_impl}**\n")
        header = (
            "| T | titans s | titans GB | titans us/token | GFLOP | % of matmul rate "
            "| titans-pytorch s | titans-pytorch GB | speed-up | memory ratio |"
        )
        summary.append(header)
        summary.append("|---" * (header.count("|") - 1) + "|")
        for row in rows:
            ours, peer = dict(row.get(ours_impl, {})), row.get("titans-pytorch", {})
            if "seconds" in ours and row.get("titans", {}).get("gflop"):
                gflops = row["titans"]["gflop"] / ours["seconds"]
                ours.update(gflop=row["titans"]["gflop"], matmul_fraction=gflops / rate)
            cell = lambda d, k, f: f.format(d[k]) if k in d else d.get("error", "-")  # noqa: E731
            both = "seconds" in ours and "seconds" in peer
            speed = f"{peer['seconds'] / ours['seconds']:.1f}x" if both else "-"
            mem = (
                f"{peer['peak_rss_gb'] / ours['peak_rss_gb']:.1f}x"
                if "peak_rss_gb" in ours and "peak_rss_gb" in peer
                else "-"
            )
            summary.append(
                f"| {row['T']} | {cell(ours, 'seconds', '{:.3f}')} | {cell(ours, 'peak_rss_gb', '{:.2f}')} "
                f"| {cell(ours, 'per_token_us', '{:.1f}')} | {cell(ours, 'gflop', '{:.0f}')} "
                f"| {cell(ours, 'matmul_fraction', '{:.0%}')} | {cell(peer, 'seconds', '{:.3f}')} "
                f"| {cell(peer, 'peak_rss_gb', '{:.2f}')} | {speed} | {mem} |"
            )
    first, last = rows[0].get("titans", {}), rows[-1].get("titans", {})
    if "per_token_us" in first and "per_token_us" in last:
        summary.append(
            f"\nper-token time T={rows[-1]['T']} / T={rows[0]['T']}: "
            f"{last['per_token_us'] / first['per_token_us']:.2f}x"
        )
    summary.append(
        f"fp32 matmul rate: {rate:.1f} GFLOP/s; median of {args.repeats} processes per cell; "
        f"batch {BATCH}, dim {DIM}, {HEADS} heads, depth {DEPTH}, expansion {EXPANSION}, chunk {CHUNK}"
    )
    text = "\n".join(summary)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"matmul_gflops": rate, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
