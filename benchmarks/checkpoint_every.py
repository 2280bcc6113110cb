"""Forward + backward time of the benchmark NeuralMemory for several checkpoint-stretch lengths.

The chunk Function keeps a chunk-start state every `CHECKPOINT_EVERY` chunks and its backward
re-walks the chunks in between. Shorter stretches re-walk less and keep more. This script times the
values in one process, alternating them step by step, checks that they give the same output and
gradients, and reports the median per value (issue 2's settings: dim 384, 4 heads, depth 2,
expansion 4, chunk 64, batch 2).

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_every.py --T 4096 --values 4,2,1 --steps 6 \
        --out benchmarks/results/checkpoint_every
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import titans.memory.chunked as chunked
from titans.memory import NeuralMemory

DIM, HEADS, DEPTH, EXPANSION, CHUNK, BATCH = 384, 4, 2, 4, 64, 2


def run(T: int, values: list[int], steps: int, dim: int = DIM, heads: int = HEADS) -> dict:
    """Times `steps` forward + backward passes per value (the order alternating), after one
    untimed pass per value that also checks its output and gradients against the first value's."""
    if T < 1 or steps < 1 or not values or min(values) < 1:
        raise ValueError(f"need T >= 1, steps >= 1 and values >= 1, got T={T}, steps={steps}, "
                         f"values={values}")
    torch.manual_seed(0)
    module = NeuralMemory(dim, heads, depth=DEPTH, expansion=EXPANSION, chunk_size=CHUNK)
    x = torch.randn(BATCH, T, dim)

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        module.zero_grad(set_to_none=True)
        out = module(x)[0]
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]

    saved = chunked.CHECKPOINT_EVERY
    try:
        ref, max_diff = None, {}
        for k in values:
            chunked.CHECKPOINT_EVERY = k
            out, grads = step()
            if ref is None:
                ref = (out, grads)
            diffs = [(a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
                     for a, b in zip([out, *grads], [ref[0], *ref[1]])]
            max_diff[k] = max(diffs)
        times: dict[int, list[float]] = {k: [] for k in values}
        for r in range(steps):
            for k in values if r % 2 == 0 else values[::-1]:
                chunked.CHECKPOINT_EVERY = k
                t0 = time.perf_counter()
                step()
                times[k].append(time.perf_counter() - t0)
    finally:
        chunked.CHECKPOINT_EVERY = saved
    return {"T": T, "threads": torch.get_num_threads(), "steps": steps,
            "rows": [{"checkpoint_every": k, "median_s": statistics.median(times[k]), "times_s": times[k],
                      "max_rel_diff_vs_first": max_diff[k]} for k in values]}


def table(result: dict) -> str:
    first = result["rows"][0]
    lines = [f"T = {result['T']}, {result['threads']} thread(s), {result['steps']} timed steps per value, "
             f"alternating", "",
             "| CHECKPOINT_EVERY | median s | / first | max relative difference of output and gradients |",
             "|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ratio = r["median_s"] / first["median_s"]
        lines.append(f"| {r['checkpoint_every']} | {r['median_s']:.3f} | {ratio:.3f} "
                     f"| {r['max_rel_diff_vs_first']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=4096, help="sequence length")
    p.add_argument("--values", default="4,2,1", help="comma-separated CHECKPOINT_EVERY values; the first is "
                   "the reference for the equality check")
    p.add_argument("--steps", type=int, default=6, help="timed steps per value")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args()
    try:
        values = [int(v) for v in args.values.split(",")]
    except ValueError:
        p.error(f"--values takes comma-separated integers, got {args.values!r}")
    try:
        result = run(args.T, values, args.steps)
    except ValueError as e:
        p.error(str(e))
    print(table(result), end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
        Path(args.out + ".md").write_text(table(result))


if __name__ == "__main__":
    main()
