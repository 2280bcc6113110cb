"""How long each neural memory of a trained model keeps what it writes, read off its forgetting gate
on a real prompt: for every memory (one per block) and head, the mean of alpha over the prompt and
the share of a write at the prompt's first token that is left at its last one,

    retention = prod_t (1 - alpha_t)        (the factor W_t = (1 - alpha_t) W_{t-1} + S_t applies),

which the momentum and later writes only lower. A pass key written more than a few 1/alpha tokens
before the question is gone, whatever the rest of the model does. The prompt is a pass-key example
(S-NIAH-1, needle at depth 0) of `--length` tokens, read in one forward pass; `--forget-scale`
reads it as `titans eval --forget-scale` does.

    python experiments/forgetting_horizon.py --checkpoint results/passkey_probe/gpu_2048/checkpoint_step185 \\
        --lengths 2032,8176,32752
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def horizon(checkpoint: str, lengths: list[int], seed: int = 0, forget_scale: float | None = None) -> dict:
    """{"rows": one per memory and length, with mean alpha and the retention per head}."""
    from titans.checkpoint import load
    from titans.memory import NeuralMemory
    from titans.tasks.niah import make_niah

    model, tokenizer = load(checkpoint)
    if forget_scale is not None and forget_scale != model.config.forget_scale:
        model.set_forget_scale(forget_scale)
    memories = [(name, m) for name, m in model.named_modules() if isinstance(m, NeuralMemory)]
    if not memories or not all(m.forgetting for _, m in memories):
        raise SystemExit(f"{checkpoint}: variant {model.config.variant!r} has no forgetting gate to read")
    rows = []
    for length in lengths:
        seen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in memories}
        hooks = []
        for name, m in memories:
            def hook(mod, args, out, name=name, m=m, seen=seen):
                g = out.float().unflatten(-1, (len(m.gate_names), m.heads, m.gates_per_head))
                alpha = torch.sigmoid(g[..., m.gate_names.index("alpha"), :, :]) * m.forget_scale
                seen[name].append(alpha[0])  # (T_call, heads, layers)
            hooks.append(m.gates.register_forward_hook(hook))
        ex = make_niah("single_1", length, 0.0, tokenizer=tokenizer, seed=seed)
        ids = torch.tensor([tokenizer.encode(ex.prompt)])
        try:
            with torch.no_grad():
                model(ids)
        finally:
            for h in hooks:
                h.remove()
        for name, _ in memories:
            alpha = torch.cat(seen[name], dim=0)  # every token of the prompt once (MAC: per segment)
            log_keep = torch.log1p(-alpha.clamp(max=1 - 1e-12)).sum(0)  # (heads, layers)
            keep = log_keep.exp()
            rows.append({"memory": name, "length": int(ids.shape[1]), "tokens_gated": int(alpha.shape[0]),
                         "alpha_mean": alpha.mean().item(),
                         "alpha_mean_per_head": alpha.mean(dim=(0, 2)).tolist(),
                         "retention_per_head": keep.amax(-1).tolist(),
                         "retention_best_head": keep.max().item(),
                         "log10_retention_best_head": log_keep.max().item() / math.log(10)})
    return {"checkpoint": checkpoint, "forget_scale": model.config.forget_scale, "seed": seed, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Forgetting horizon of `{result['checkpoint']}` (forget_scale {result['forget_scale']:g}):",
             "", "| memory | prompt tokens | mean alpha | 1 / mean alpha | retention, best head |",
             "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        inv = 1 / r["alpha_mean"] if r["alpha_mean"] > 0 else math.inf
        lines.append(f"| {r['memory']} | {r['length']} | {r['alpha_mean']:.2e} | {inv:,.0f} | "
                     f"10^{r['log10_retention_best_head']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run folder or a checkpoints/step_* folder")
    p.add_argument("--lengths", default="2032", help="comma-separated prompt lengths in tokens (>= 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forget-scale", type=float, default=None, metavar="S",
                   help="read with every memory's forgetting gate multiplied by S in [0, 1] "
                        "(default: as trained, 1 unless the run set model.forget_scale)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON here")
    args = p.parse_args()
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        p.error(f"--lengths {args.lengths!r}: expected comma-separated integers")
    if not lengths or min(lengths) < 100:
        p.error(f"--lengths {args.lengths!r}: each length must be >= 100 (the needle and question fit)")
    if args.forget_scale is not None and not 0 <= args.forget_scale <= 1:
        p.error(f"--forget-scale must lie in [0, 1], got {args.forget_scale}")
    result = horizon(args.checkpoint, lengths, args.seed, args.forget_scale)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown(result))


if __name__ == "__main__":
    main()
