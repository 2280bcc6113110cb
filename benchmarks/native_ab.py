"""The memory layer's step with the C++ chunk loops against the eager ones, in one process, and where
the step's time goes.

Settings of benchmarks/memory_speed.py (dim 384, 4 heads, 2-layer memory, expansion 4, chunk 64,
batch 2). One module and one input; `titans.memory.native_chunks` is toggled between steps, the two
alternating, so both see the same machine state; the median of --steps steps each, and their ratio.
With --split, the C++ loops' steps are also divided into: time inside the extension's calls for the
memory (chunk loops, coefficients), the rest of the memory's autograd Function (its Python:
normalisation, checkpoint copies), and the layer outside the recurrence (projections, convolution,
gates, norms, their backward; the share of the extension's convolution and output gate is reported).

    python benchmarks/native_ab.py --T 4096 --steps 5            # threads as OMP_NUM_THREADS says
    python benchmarks/native_ab.py --T 4096 --steps 3 --split
"""

from __future__ import annotations

import argparse
import statistics
import time

from memory_speed import BATCH, DIM, build, step


class Timed:
    """Wraps the extension and the memory's autograd Function with timers (seconds, summed)."""

    def __init__(self):
        from titans.memory import chunked, native

        self.ext, self.native, self.chunked = native.module(), native, chunked
        self.seconds = {"extension": 0.0, "function": 0.0, "layer_cpp": 0.0}
        self.saved = (native._STATE["module"], chunked._MemoryChunks.forward, chunked._MemoryChunks.backward)

    def _timed(self, fn, key):
        def run(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[key] += time.perf_counter() - t0
        return run

    def __enter__(self):
        ext, timed = self.ext, self._timed

        class Ext:  # every entry point, timed: the memory's (chunk loops, coefficients) and the layer's
            def __getattr__(self, name):
                key = "layer_cpp" if name.startswith(("conv_", "gated_output_")) else "extension"
                return timed(getattr(ext, name), key)

        self.native._STATE["module"] = Ext()
        F = self.chunked._MemoryChunks
        F.forward = staticmethod(timed(self.saved[1], "function"))
        F.backward = staticmethod(timed(self.saved[2], "function"))
        return self

    def __exit__(self, *exc):
        F = self.chunked._MemoryChunks
        self.native._STATE["module"] = self.saved[0]
        F.forward, F.backward = staticmethod(self.saved[1]), staticmethod(self.saved[2])


def ab(T: int, steps: int) -> dict:
    """Median step seconds with the C++ loops ("native") and the eager loops, alternating."""
    import torch

    from titans.memory import chunks_native, native_chunks

    if not chunks_native():
        raise SystemExit("the C++ chunk loops are not available here (no compiler, or TITANS_NATIVE=0)")
    torch.manual_seed(0)
    module = build("titans")
    x = torch.randn(BATCH, T, DIM, requires_grad=True)
    times: dict[str, list[float]] = {"native": [], "eager": []}
    for mode in times:  # warm-up of each
        native_chunks(mode == "native")
        step(module, x[:, :256])
    for _ in range(steps):
        for mode, ts in times.items():
            native_chunks(mode == "native")
            module.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step(module, x)
            ts.append(time.perf_counter() - t0)
    native_chunks(True)
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    return {"T": T, "seconds": times, "median": med, "ratio": med["native"] / med["eager"]}


def split(T: int, steps: int) -> list[dict]:
    """Per step with the C++ loops: total, inside the memory's C++, rest of the memory Function, outside
    (and the C++ part of outside)."""
    import torch

    torch.manual_seed(0)
    module = build("titans")
    x = torch.randn(BATCH, T, DIM, requires_grad=True)
    step(module, x[:, :256])
    rows = []
    for _ in range(steps):
        with Timed() as timed:
            module.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step(module, x)
            total = time.perf_counter() - t0
        ext, fn, layer_cpp = (timed.seconds[k] for k in ("extension", "function", "layer_cpp"))
        rows.append({"step": total, "extension": ext, "memory_python": fn - ext,
                     "outside_memory": total - fn, "layer_cpp": layer_cpp})
    return rows


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (default 5)")
    p.add_argument("--split", action="store_true", help="also split the C++ loops' step time")
    args = p.parse_args()
    if args.T < 64 or args.steps < 1:
        p.error("--T must be at least 64 and --steps at least 1")
    r = ab(args.T, args.steps)
    fmt = lambda ts: " / ".join(f"{t:.3f}" for t in ts)  # noqa: E731
    print(f"T = {args.T}, {torch.get_num_threads()} thread(s): C++ loops {r['median']['native']:.3f} s, "
          f"eager loops {r['median']['eager']:.3f} s, ratio {r['ratio']:.3f} "
          f"(per step {fmt(r['seconds']['native'])} against {fmt(r['seconds']['eager'])})")
    if args.split:
        for row in split(args.T, args.steps):
            print("step {step:.3f} s: the memory's C++ {extension:.3f}, its Python {memory_python:.3f}, "
                  "outside the memory {outside_memory:.3f} (of which C++ {layer_cpp:.3f}: convolution, "
                  "output gate)".format(**row))


if __name__ == "__main__":
    main()
