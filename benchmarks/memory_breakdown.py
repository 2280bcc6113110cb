"""Where the memory layer's peak RSS goes (issue 2's benchmark setting, one forward + backward):
the tensors autograd saves in the forward pass, and the process RSS at the start, after the
forward, around the chunk step's backward, and the peak.

    OMP_NUM_THREADS=1 python benchmarks/memory_breakdown.py --T 4096

(An earlier --recompute option wrapped the chunk coefficients and the projections in
torch.utils.checkpoint; both are now recomputed by the layer's own Functions, see the results file.)
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import memory_speed as ms
    import psutil
    import torch

    import titans.memory.chunked as chunked

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=4096)
    args = p.parse_args()

    proc, marks = psutil.Process(), {}

    def mark(label: str) -> None:
        marks[label] = round(proc.memory_info().rss / 1e6)

    backward = chunked._MemoryChunks.backward

    def traced_backward(ctx, *grads):
        mark("chunk step backward: start")
        out = backward(ctx, *grads)
        mark("chunk step backward: end")
        return out

    chunked._MemoryChunks.backward = traced_backward
    torch.manual_seed(0)
    module = ms.build("titans")
    ms.step(module, torch.randn(ms.BATCH, 256, ms.DIM))  # warm-up
    module.zero_grad(set_to_none=True)
    x = torch.randn(ms.BATCH, args.T, ms.DIM, requires_grad=True)
    saved: dict[int, tuple[int, tuple]] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), tuple(t.shape))
        return t

    mark("start")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)[0]
    mark("after forward")
    out.float().square().mean().backward()
    mark("after backward")
    by_shape = collections.Counter()
    for nbytes, shape in saved.values():
        by_shape[str(shape)] += nbytes
    result = {"T": args.T, "threads": torch.get_num_threads(),
              "saved_mb": round(sum(n for n, _ in saved.values()) / 1e6),
              "saved_by_shape_mb": {k: round(v / 1e6, 1) for k, v in by_shape.most_common(8)},
              "rss_mb": marks, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3),
              "grad_abs_sum": x.grad.double().abs().sum().item()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
