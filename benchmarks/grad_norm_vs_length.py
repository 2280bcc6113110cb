"""Outer-gradient norm against sequence length, with full and truncated backpropagation.

For every variant of the `tiny` preset, at initialisation (seed 0) and, where it exists, from its
Table-1 checkpoint (out/table1/<variant>-s0): the norm of the gradient of the mean next-byte loss
on the first T bytes of the validation split, for T = 256 ... 2048 with full backpropagation, and
at the longest T with `train.bptt` pieces (`titans.train.forward_backward`). A norm that grows
by orders of magnitude with T means backprop through the recurrence explodes.

    python benchmarks/grad_norm_vs_length.py                 # needs the corpus: titans data build
    python benchmarks/grad_norm_vs_length.py --variants mac,lmm,mag,mal --set forget_to=init \
        --out benchmarks/results/grad_norm_forget_to_init     # the same with a TitansConfig override
    python benchmarks/grad_norm_vs_length.py --variants mac --checkpoint out/pk_mac_wn_256 \
        --set first_order=true --out ...                       # also any saved model (run folder or step)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from titans.checkpoint import open_checkpoint
from titans.data.corpus import load_documents
from titans.data.tokenizer import get_tokenizer
from titans.model import VARIANTS, TitansConfig, TitansLM
from titans.train import forward_backward


def grad_norm(model: TitansLM, tokens: torch.Tensor, T: int, bptt: int = 0) -> float:
    model.zero_grad(set_to_none=True)
    x = tokens[: T + 1].unsqueeze(0)
    forward_backward(model, x[:, :-1], x[:, 1:], bptt=bptt)
    grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
    return torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--lengths", default="256,512,1024,2048")
    p.add_argument("--bptt", type=int, default=256)
    p.add_argument("--data", default="data")
    p.add_argument("--runs", default="out/table1", help="Table-1 run folders (<variant>-s0)")
    p.add_argument("--checkpoint", action="append", default=[],
                   help="also measure this saved model (run folder or checkpoint step; repeatable); "
                        "rows named by the path")
    p.add_argument("--out", default="benchmarks/results/grad_norm_vs_length")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="TitansConfig override for every model, also the trained ones (e.g. forget_to=init)")
    args = p.parse_args()
    overrides = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            p.error(f"--set expects FIELD=VALUE, got {item!r}")
        overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tn" else value
    lengths = [int(t) for t in args.lengths.split(",")]
    text = "\n\n".join(d.text for d in load_documents(args.data, "val"))
    tokens = torch.tensor(get_tokenizer("byte").encode(text[: 4 * max(lengths)])[: max(lengths) + 1])
    rows = []
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        models = [("init", TitansLM(TitansConfig.from_preset("tiny", variant=variant, **overrides)))]
        run = Path(args.runs) / f"{variant}-s0"
        saved = [("trained (Table 1)", run)] if run.exists() else []
        saved += [(path, Path(path)) for path in args.checkpoint
                  if open_checkpoint(path).config.variant == variant]
        for name, path in saved:
            ckpt = open_checkpoint(path)
            trained = TitansLM(TitansConfig.from_dict({**ckpt.config.to_dict(), **overrides}))
            ckpt.load_weights(trained)
            models.append((name, trained))
        for when, model in models:
            model.train()
            norms = {T: grad_norm(model, tokens, T) for T in lengths}
            truncated = grad_norm(model, tokens, lengths[-1], args.bptt)
            rows.append({"variant": variant, "weights": when, "full": norms, "bptt": truncated})
            print(f"{variant:15s} {when:18s} " + " ".join(f"{n:9.3g}" for n in norms.values())
                  + f"  | bptt {args.bptt}: {truncated:.3g}", flush=True)
    head = ("| variant | weights | " + " | ".join(f"T={T}" for T in lengths)
            + f" | T={lengths[-1]}, bptt {args.bptt} |")
    lines = [head, "|---|---|" + "---:|" * (len(lengths) + 1)]
    for r in rows:
        cells = " | ".join(f"{n:.3g}" for n in r["full"].values())
        lines.append(f"| {r['variant']} | {r['weights']} | {cells} | {r['bptt']:.3g} |")
    text = "\n".join(lines) + (
        "\n\nNorm of the outer gradient of the mean next-byte loss on the first T bytes of the validation "
        "split (tiny preset, batch 1, float32, grad_clip 1.0 inside the memory"
        + (f"; overrides {overrides}" if overrides else "") + ").\n")
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
