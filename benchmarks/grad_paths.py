"""Which paths make the outer gradient explode with length: MAC on its own task rows.

For a saved model (default: the 256-token pass-key MAC, `out/pk_mac_wn_256`), the norm of the outer
gradient of the mean next-token loss on S-NIAH-1 rows of T tokens (the training layout: separators,
prompt, answer, separator; needle depth drawn; three rows per length, each its own norm), with full
backpropagation and with the gradient-only options that cut one path each:

- `first_order`: the inner gradients' own dependence on the weights they are taken at (the inner
  loop's second derivatives);
- `detach_write`: MAC's segment loop, weights -> memory tokens h -> attention -> write -> weights;
- `detach_kv`: the same loop, cut at the write only (the read-back keeps its gradient into attention);
- `second_order s`: a share s of the inner loop's second derivatives kept (first_order is s = 0).

The forward pass is the same in every row of the table (the options change gradients only).

    python benchmarks/grad_paths.py                      # about 4 min on one core
    python benchmarks/grad_paths.py --checkpoint out/pk_mac_fodw_1024 --out ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from titans.checkpoint import open_checkpoint
from titans.model import TitansConfig, TitansLM
from titans.tasks.niah import make_niah

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grad_norm_vs_length import grad_norm  # noqa: E402  (the same norm as the text table)

OPTIONS = {
    "full backprop": {},
    "first_order": {"first_order": True},
    "detach_write": {"detach_write": True},
    "first_order + detach_write": {"first_order": True, "detach_write": True},
    "detach_kv": {"detach_kv": True},
    "first_order + detach_kv": {"first_order": True, "detach_kv": True},
    "second_order 0.5 + detach_write": {"second_order": 0.5, "detach_write": True},
    "second_order 0.75 + detach_write": {"second_order": 0.75, "detach_write": True},
    "second_order 0.5 + detach_kv": {"second_order": 0.5, "detach_kv": True},
}


def row(tokenizer, length: int, seed: int) -> torch.Tensor:
    """One S-NIAH-1 training row of `length` + 1 tokens, left-padded with separators."""
    ex = make_niah("single_1", length - 16, None, tokenizer=tokenizer, seed=seed)
    sep = tokenizer.eos_id
    ids = tokenizer.encode(ex.prompt) + tokenizer.encode(ex.answer) + [sep]
    ids = [sep] * max(0, length + 1 - len(ids)) + ids
    return torch.tensor([ids[-(length + 1):]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="out/pk_mac_wn_256")
    p.add_argument("--lengths", default="256,512,1024,2048")
    p.add_argument("--rows", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/grad_paths")
    p.add_argument("--options", default=",".join(OPTIONS),
                   help=f"which rows, comma-separated (default: all of {', '.join(OPTIONS)})")
    args = p.parse_args()
    lengths = [int(t) for t in args.lengths.split(",")]
    chosen = [o.strip() for o in args.options.split(",")]
    unknown = [o for o in chosen if o not in OPTIONS]
    if unknown:
        p.error(f"--options: unknown {unknown}; choose from {', '.join(OPTIONS)}")
    ckpt = open_checkpoint(args.checkpoint)
    tokenizer = ckpt.tokenizer()
    results = []
    for name, opts in OPTIONS.items():
        if name not in chosen:
            continue
        if ("detach_write" in opts or "detach_kv" in opts) and ckpt.config.variant != "mac":
            continue
        model = TitansLM(TitansConfig.from_dict({**ckpt.config.to_dict(), **opts}))
        ckpt.load_weights(model)
        model.train()
        norms = {}
        for T in lengths:
            norms[T] = []
            for seed in range(args.rows):
                norms[T].append(grad_norm(model, row(tokenizer, T, seed)[0], T))
        results.append({"options": name, "norms": norms})
        print(f"{name:28s} " + " | ".join(f"{T}: " + ", ".join(f"{n:.3g}" for n in ns)
                                         for T, ns in norms.items()), flush=True)
    head = "| gradient | " + " | ".join(f"T={T}" for T in lengths) + " |"
    lines = [head, "|---|" + "---:|" * len(lengths)]
    for r in results:
        lines.append(f"| {r['options']} | " + " | ".join(
            f"{min(ns):.3g}–{max(ns):.3g}" for ns in r["norms"].values()) + " |")
    text = "\n".join(lines) + (
        f"\n\nNorm of the outer gradient (min–max over {args.rows} S-NIAH-1 rows per length, batch 1, "
        f"float32) of `{args.checkpoint}` (step {ckpt.step}); `python benchmarks/grad_paths.py "
        f"--checkpoint {args.checkpoint} --lengths {args.lengths}"
        + ("" if chosen == list(OPTIONS) else f" --options '{args.options}'") + "`.\n")
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"checkpoint": args.checkpoint, "step": ckpt.step,
                                                    "results": results}, indent=1))


if __name__ == "__main__":
    main()
