"""Training-step throughput and peak memory vs sequence length for every variant (the analog of
the paper's throughput figure): equal width and depth, batch 1, each measurement in its own
process, median over --repeats. Writes a markdown table, JSON and a PNG.

    python benchmarks/model_speed.py                       # 1K, 4K, 16K, 32K, all variants
    python benchmarks/model_speed.py --lengths 1024,4096 --variants mac,transformer
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ["transformer", "swa", "gated_deltanet", "ttt_mlp", "lmm", "mac", "mag", "mal"]
# tiny-preset width and depth for every variant (same dim, layers, heads, MLP width)
SETTINGS = dict(
    dim=128,
    n_layers=4,
    n_heads=4,
    mlp_hidden=384,
    chunk_size=16,
    segment_len=128,
    window=256,
    n_persistent=4,
    vocab_size=256,
)


def make_step(variant: str, dtype: str):
    """A fresh tiny model of `variant` (SETTINGS) with AdamW; returns step(tokens) -> (seconds,
    whether the gradient was finite) for one training step on tokens (1, T + 1)."""
    import torch

    from titans.model import TitansConfig, TitansLM

    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant=variant, **SETTINGS))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(tokens):
        """A non-finite gradient (the memory variants' outer gradient overflows at long T from this
        init under the paper's rule, benchmarks/results/grad_norm_vs_length.md) skips the update, as
        a trainer does, so the next step runs on finite weights."""
        bf16 = dtype == "bf16"
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, _ = model(tokens[:, :-1])
            targets = tokens[:, 1:].flatten()
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets)
        loss.backward()
        finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        if finite:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, finite

    return step


def worker(variant: str, T: int, dtype: str, steps: int) -> dict:
    import torch

    step = make_step(variant, dtype)
    step(torch.randint(0, 256, (1, 257)))  # warm-up: thread pools, first-call costs
    tokens = torch.randint(0, 256, (1, T + 1))
    # The first step at a new length also grows the heap to the new peak, and every fresh page
    # costs a fault (about 7 s of kernel time at 4 GB here); later steps reuse it. Both are kept:
    # the table reports the steady state (the median of the steps after the first).
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    first, finite = step(tokens)
    faults1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    later = [step(tokens)[0] for _ in range(steps - 1)]
    faults2 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = statistics.median(later) if later else first
    return {
        "variant": variant,
        "T": T,
        "seconds": seconds,
        "tokens_per_s": T / seconds,
        "first_step_seconds": first,
        "first_step_page_faults": faults1 - faults0,
        "later_step_page_faults": (faults2 - faults1) / max(len(later), 1),
        "grad_finite": finite,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,4096,16384,32768")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=2,
                   help="training steps per process at the measured length; the first grows the heap "
                        "(page faults) and is reported apart, the rest give the steady state (1: first only)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement before giving up")
    p.add_argument("--out", default="benchmarks/results/model_speed")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.dtype, args.steps)))
        return
    lengths = [int(t) for t in args.lengths.split(",")]
    variants = args.variants.split(",")
    results: dict[str, dict[int, dict]] = {}
    for v in variants:
        for T in lengths:
            runs = []
            for _ in range(args.repeats):
                cmd = [sys.executable, __file__, "--worker", v, str(T), "--dtype", args.dtype,
                       "--steps", str(args.steps)]
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    runs = [{"error": f"over {args.timeout:.0f} s"}]
                    break
                if out.returncode:
                    runs = [{"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:80]}]
                    break
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            ok = [r for r in runs if "error" not in r]
            cell = (
                {
                    "seconds": statistics.median(r["seconds"] for r in ok),
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
                    "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in ok),
                    "first_step_seconds": statistics.median(r["first_step_seconds"] for r in ok),
                    "first_step_page_faults": statistics.median(r["first_step_page_faults"] for r in ok),
                    "later_step_page_faults": statistics.median(r["later_step_page_faults"] for r in ok),
                    "grad_finite": all(r["grad_finite"] for r in ok),
                }
                if ok
                else runs[0]
            )
            results.setdefault(v, {})[T] = cell
            shown = f"{cell['tokens_per_s']:.0f} tok/s, {cell['peak_rss_gb']:.2f} GB" if ok else cell["error"]
            print(f"{v:15s} T={T:6d}: {shown}", flush=True)

    lines = [
        "| variant | "
        + " | ".join(f"T={T} tok/s (GB)" for T in lengths)
        + f" | per-token time T={lengths[-1]} / T={lengths[0]} | same, first step at each length |",
        "|---" * (len(lengths) + 3) + "|",
    ]

    def growth(v: str, key: str) -> str:
        first, last = results[v][lengths[0]], results[v][lengths[-1]]
        if key not in first or key not in last:
            return "-"
        return f"{(last[key] / lengths[-1]) / (first[key] / lengths[0]):.2f}x"

    for v in variants:
        cells = [
            f"{c['tokens_per_s']:.0f} ({c['peak_rss_gb']:.2f})" + ("" if c["grad_finite"] else "*")
            if "tokens_per_s" in c else c["error"]
            for c in (results[v][T] for T in lengths)
        ]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {growth(v, 'seconds')} | "
                     f"{growth(v, 'first_step_seconds')} |")
    lines.append(
        f"\nOne training step (forward, backward, gradient clip 1.0, AdamW) at batch 1, {args.dtype}, "
        f"median of {args.repeats} processes; settings {SETTINGS}. Tokens/s is the steady state: "
        f"the median of steps 2..{args.steps} at each length in each process. The first step at a "
        f"length also grows the heap (one page fault per fresh 4 KB page; JSON: "
        f"first_step_seconds, first_step_page_faults). * the gradient at that length was not finite "
        f"(the memory variants' outer gradient overflows at long T from this init under the paper's "
        f"rule; the update is skipped)."
    )
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"settings": SETTINGS, "results": results}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        pts = [(T, results[v][T]["tokens_per_s"]) for T in lengths if "tokens_per_s" in results[v][T]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=v, linestyle="--" if v in ("transformer", "swa") else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("training tokens / s")
    ax.set_title("Training throughput vs sequence length (CPU, 2 cores)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.md')}, .json, .png")


if __name__ == "__main__":
    main()
