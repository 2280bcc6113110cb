"""Eager vs torch.compile'd memory chunk step (`titans.memory.compile_chunks`) vs CUDA-graph replays
of the chunk loops (`titans.memory.graph_chunks`) and both together, on one device.

On a GPU the eager chunk loop is bound by kernel launches (about 250 small ops per chunk forward
and backward at memory depth 2), so its speed hardly depends on the GPU. This script measures
what compiling the chunk step and replaying captured graphs change, in one process, eager first
(--modes, default eager,compiled; also graphs and compiled+graphs):

1. NeuralMemory forward + backward at the issue-2 settings (benchmarks/memory_speed.py: dim 384,
   4 heads, depth 2, expansion 4, chunk 64, batch 2) at each --lengths: median of 3 seconds, peak
   device memory, and the relative difference of the output and input gradient from eager's
   (judged up to T = 4096 only: further on, float32 rounding differences grow to O(1) in any two
   float32 runs of the default memory, benchmarks/sensitivity.py).
2. One training step (bf16 autocast on CUDA, AdamW) of the `170m` lmm and mac models at
   --model-len tokens, eager then compiled.

The first call of each new shape compiles and/or captures (reported as first_call_s, not in the
timings).
Rows are written to <out>.json / <out>.md after each measurement; cells that would pass
--deadline seconds are skipped.

    python benchmarks/compile_speed.py --deadline 280            # on the GPU
    python benchmarks/compile_speed.py --modes eager,graphs,compiled,compiled+graphs --deadline 280
    python benchmarks/compile_speed.py --device cpu --quick      # the same code paths, small
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from gpu_checks import model_step_inputs, peak_gb, rel, reset_peak, timed, to_markdown, train_step
from memory_speed import BATCH, DIM, build
from memory_speed import step as memory_step

from titans.memory import compile_chunks, graph_chunks

MODES = ("eager", "compiled", "graphs", "compiled+graphs")


def set_mode(mode: str) -> None:
    """eager, compiled (torch.compile'd chunk step), graphs (CUDA-graph replays) or compiled+graphs."""
    compile_chunks("compiled" in mode)
    graph_chunks("graphs" in mode)


def memory_rows(device: str, lengths: list[int], modes: list[str], deadline: float, on_row) -> None:
    eager: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for mode in modes:
        set_mode(mode)
        fast = mode != "eager"
        for T in lengths:
            name = f"memory {mode} T={T}"
            guess = 6 * eager[T][2] if fast and T in eager else 0.0
            if time.perf_counter() + guess > deadline:
                on_row({"check": name, "skipped": "deadline", "ok": True})
                continue
            torch.manual_seed(0)
            module = build("titans").to(device)
            x = torch.randn(BATCH, T, DIM, device=device, requires_grad=True)
            first = timed(memory_step, device, module, x)  # warm-up; compiles when compiled
            x.grad = None
            reset_peak(device)
            times = [timed(memory_step, device, module, x) for _ in range(3)]
            with torch.no_grad():
                y = module(x)[0]
            seconds = statistics.median(times)
            row = {"check": name, "seconds": seconds, "tokens_per_s": BATCH * T / seconds,
                   "peak_gb": peak_gb(device), "first_call_s": first, "ok": True}
            if fast and T in eager:
                row["speedup"] = eager[T][2] / seconds
                row["rel_diff_y"] = rel(y, eager[T][0])
                row["rel_diff_dx"] = rel(x.grad, eager[T][1])  # 3 backward passes accumulated in both
                # beyond a few thousand tokens the float32 recurrence amplifies rounding to O(1)
                # (benchmarks/sensitivity.py), so two float32 runs are compared only up to 4096
                if T <= 4096:
                    row["ok"] = row["rel_diff_y"] < 1e-4 and row["rel_diff_dx"] < 1e-3
            else:
                eager[T] = (y, x.grad.clone(), seconds)
            on_row(row)
    set_mode("eager")


def model_rows(device: str, preset: str, T: int, modes: list[str], deadline: float, on_row,
               variants=("lmm", "mac")) -> None:
    for variant in variants:
        base = None
        for mode in modes:
            set_mode(mode)
            name = f"model {preset} {variant} {mode} T={T}"
            if time.perf_counter() + (3 * base if base else 0) > deadline:
                on_row({"check": name, "skipped": "deadline", "ok": True})
                continue
            model, opt, tokens = model_step_inputs(preset, variant, T, device)
            reset_peak(device)
            first = timed(train_step, device, model, opt, tokens)
            seconds = timed(train_step, device, model, opt, tokens)
            row = {"check": name, "seconds": seconds, "tokens_per_s": T / seconds, "peak_gb": peak_gb(device),
                   "first_call_s": first, "ok": True}
            if mode != "eager" and base:
                row["speedup"] = base / seconds
            else:
                base = seconds
            on_row(row)
    set_mode("eager")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (a CPU run of the same code paths)")
    p.add_argument("--lengths", default=None, help="memory lengths (default 4096,32768; quick: 128)")
    p.add_argument("--model-len", type=int, default=None, help="model step tokens (default 2048; quick: 64)")
    p.add_argument("--modes", default="eager,compiled",
                   help=f"comma list, eager first (the reference of speed-ups): {', '.join(MODES)}")
    p.add_argument("--variants", default="lmm,mac", help="model rows for these variants (lmm, mac)")
    p.add_argument("--deadline", type=float, default=0.0, help="seconds for the whole run (0: none)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = args.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    out = Path(args.out or f"benchmarks/results/compile_speed_{slug}")
    lengths = [int(t) for t in (args.lengths or ("128" if args.quick else "4096,32768")).split(",")]
    model_len = args.model_len or (64 if args.quick else 2048)
    deadline = time.perf_counter() + args.deadline if args.deadline else float("inf")
    results: dict[str, list[dict]] = {"memory": [], "model": []}

    def save() -> str:
        text = to_markdown(name, results)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        rows = [r for part in results.values() for r in part]
        out.with_suffix(".json").write_text(json.dumps({"device": name, "torch": torch.__version__,
                                                        "rows": rows}, indent=1))
        return text

    def adder(part):
        def on_row(row):
            results[part].append(row)
            print(f"  {row}", file=sys.stderr, flush=True)
            save()
        return on_row

    modes = args.modes.split(",")
    if modes[0] != "eager" or any(m not in MODES for m in modes):
        p.error(f"--modes {args.modes}: expected a comma list of {', '.join(MODES)}, starting with eager")
    memory_rows(device, lengths, modes, deadline, adder("memory"))
    model_rows(device, "tiny" if args.quick else "170m", model_len, modes, deadline, adder("model"),
               [v for v in args.variants.split(",") if v])
    print(save())
    return 0 if all(r["ok"] for part in results.values() for r in part) else 1


if __name__ == "__main__":
    sys.exit(main())
