"""Two training steps of a preset at one length, reporting the loss, the gradient norm and which
parameters got a non-finite gradient: where a "NaN input" in the second step comes from.

    python benchmarks/first_steps_finite.py lmm 8192            # 170m, bf16 autocast, seed 0

2026-11-27 (CPU): 170m lmm at 8192 tokens has a finite loss (10.52) and a NaN gradient in 175
parameter tensors at step 0; after AdamW, step 1's forward stops on NaN activations.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from titans.model import VARIANTS, TitansConfig, TitansLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("T", type=int)
    p.add_argument("--preset", default="170m")
    args = p.parse_args()
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset(args.preset, variant=args.variant))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, model.config.vocab_size, (1, args.T + 1))
    for step in range(2):
        t0 = time.time()
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, _ = model(tokens[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        except FloatingPointError as e:
            print(f"step {step}: forward error: {e}", flush=True)
            break
        loss.backward()
        grads = {n: q.grad for n, q in model.named_parameters() if q.grad is not None}
        bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
        total = torch.nn.utils.get_total_norm(list(grads.values())).item()
        print(f"step {step}: loss {loss.item():.4f}, grad norm {total:.3e}, non-finite gradients in "
              f"{len(bad)} tensors {bad[:3]}, {time.time() - t0:.0f} s", flush=True)
        opt.step()
        opt.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
