"""One MAC training step (forward, backward, AdamW) against titans-pytorch 0.5.5's
MemoryAsContextTransformer: dim 384, 4 blocks, segment 128, 4 persistent tokens, byte vocabulary,
batch 1, T = 2048. Each measurement in its own process (peak RSS), alternating, median of 3.

titans runs at its default memory chunk of 16 tokens (SPEC §5: 8 inner updates per segment);
titans-chunk128 at the peer's granularity (its MAC sets the memory chunk to the segment length,
one inner update per segment), the like-for-like comparison of work.

    pip install -e '.[bench]' && python benchmarks/mac_vs_peer.py
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

DIM, DEPTH, SEGMENT, PERSISTENT, VOCAB = 384, 4, 128, 4, 256


def build(impl: str):
    if impl in ("titans", "titans-chunk128"):
        from titans.model import TitansConfig, TitansLM

        cfg = TitansConfig(
            variant="mac",
            vocab_size=VOCAB,
            dim=DIM,
            n_layers=DEPTH,
            n_heads=8,
            segment_len=SEGMENT,
            n_persistent=PERSISTENT,
            mlp_hidden=1024,
            chunk_size=128 if impl == "titans-chunk128" else 16,
        )
        model = TitansLM(cfg)

        def loss_fn(tokens):
            logits, _ = model(tokens[:, :-1])
            return __import__("torch").nn.functional.cross_entropy(
                logits.flatten(0, 1), tokens[:, 1:].flatten()
            )

        return model, loss_fn
    if impl == "titans-pytorch":
        from titans_pytorch import MemoryAsContextTransformer

        model = MemoryAsContextTransformer(
            num_tokens=VOCAB, dim=DIM, depth=DEPTH, segment_len=SEGMENT, num_persist_mem_tokens=PERSISTENT
        )
        return model, lambda tokens: model(tokens, return_loss=True)
    raise ValueError(f"unknown implementation {impl!r}")


def worker(impl: str, T: int) -> dict:
    import torch

    torch.manual_seed(0)
    model, loss_fn = build(impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(tokens):
        loss_fn(tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(torch.randint(0, VOCAB, (1, 257)))
    tokens = torch.randint(0, VOCAB, (1, T + 1))
    t0 = time.perf_counter()
    step(tokens)
    s = time.perf_counter() - t0
    return {
        "impl": impl,
        "seconds": s,
        "tokens_per_s": T / s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/mac_vs_peer")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.T)))
        return
    impls = ["titans", "titans-chunk128", "titans-pytorch"]
    runs: dict[str, list] = {i: [] for i in impls}
    for r in range(args.repeats):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", impl, "--T", str(args.T)],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                raise SystemExit(f"{impl} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[impl].append(res)
            print(
                f"{impl:15s} run {r + 1}: {res['tokens_per_s']:.0f} tok/s, {res['peak_rss_gb']:.2f} GB",
                flush=True,
            )
    med = {
        i: {k: statistics.median(x[k] for x in runs[i]) for k in ("tokens_per_s", "peak_rss_gb", "params")}
        for i in impls
    }
    peer = med["titans-pytorch"]
    rows = []
    for i, m in med.items():
        speed, mem = m["tokens_per_s"] / peer["tokens_per_s"], peer["peak_rss_gb"] / m["peak_rss_gb"]
        rows.append(f"| {i} | {m['params'] / 1e6:.1f}M | {m['tokens_per_s']:.0f} | {m['peak_rss_gb']:.2f} | "
                    f"{speed:.1f}x | {mem:.1f}x |")
    head = "| implementation | params | tokens/s | peak RSS GB | speed-up vs peer | memory vs peer |"
    text = "\n".join([head, "|---|---|---|---|---|---|", *rows,
                      f"\nT = {args.T}, batch 1, median of {args.repeats} processes per implementation, "
                      "alternating"])
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "median": med}, indent=1))


if __name__ == "__main__":
    main()
