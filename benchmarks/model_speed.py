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


def worker(variant: str, T: int, dtype: str) -> dict:
    import torch

    from titans.model import TitansConfig, TitansLM

    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset("tiny", variant=variant, **SETTINGS))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(tokens):
        bf16 = dtype == "bf16"
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        with ctx:
            logits, _ = model(tokens[:, :-1])
            targets = tokens[:, 1:].flatten()
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(torch.randint(0, 256, (1, 257)))  # warm-up
    tokens = torch.randint(0, 256, (1, T + 1))
    t0 = time.perf_counter()
    step(tokens)
    seconds = time.perf_counter() - t0
    return {
        "variant": variant,
        "T": T,
        "seconds": seconds,
        "tokens_per_s": T / seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,4096,16384,32768")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement before giving up")
    p.add_argument("--out", default="benchmarks/results/model_speed")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.dtype)))
        return
    lengths = [int(t) for t in args.lengths.split(",")]
    variants = args.variants.split(",")
    results: dict[str, dict[int, dict]] = {}
    for v in variants:
        for T in lengths:
            runs = []
            for _ in range(args.repeats):
                cmd = [sys.executable, __file__, "--worker", v, str(T), "--dtype", args.dtype]
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
        + f" | per-token time T={lengths[-1]} / T={lengths[0]} |",
        "|---" * (len(lengths) + 2) + "|",
    ]
    for v in variants:
        cells = [
            f"{c['tokens_per_s']:.0f} ({c['peak_rss_gb']:.2f})" if "tokens_per_s" in c else c["error"]
            for c in (results[v][T] for T in lengths)
        ]
        first, last = results[v][lengths[0]], results[v][lengths[-1]]
        growth = (
            f"{first['tokens_per_s'] / last['tokens_per_s']:.2f}x"
            if "tokens_per_s" in first and "tokens_per_s" in last
            else "-"
        )
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {growth} |")
    lines.append(
        f"\nOne training step (forward, backward, AdamW) at batch 1, {args.dtype}, median of "
        f"{args.repeats} processes; settings {SETTINGS}."
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
