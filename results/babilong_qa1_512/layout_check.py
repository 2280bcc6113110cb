"""The QA1 MAC on held-out stories laid out as training rows: answer loss when the answer ends the
513-token row (its last segment), and when the row is 3 tokens longer (the answer 3 tokens before
the segment's end). README, BABILong analog.

    python results/babilong_qa1_512/layout_check.py out/qa1_512_s0 20
"""

import sys

import torch
import torch.nn.functional as F

from titans.checkpoint import load
from titans.evaluate import haystack_text
from titans.tasks import make_babilong


def rows(tok, exs, total):
    xs, ys = [], []
    for ex in exs:
        answer = tok.encode(ex.answer) + [tok.eos_id]
        ids = tok.encode(ex.prompt) + answer
        ids = torch.tensor([tok.eos_id] * (total - len(ids)) + ids)
        y = ids[1:].clone()
        y[: len(y) - len(answer)] = -100  # only the answer and its separator are scored
        xs.append(ids[:-1])
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def main():
    model, tok = load(sys.argv[1])
    n = int(sys.argv[2])
    hay = haystack_text("data")
    exs = [make_babilong(1, 496, haystack=hay, tokenizer=tok, seed=i) for i in range(n)]
    with torch.no_grad():
        for total in (513, 516):
            x, y = rows(tok, exs, total)
            logits, _ = model(x)
            scored = y != -100
            loss = F.cross_entropy(logits[scored], y[scored]).item()
            print(f"row of {total - 1} tokens: {loss:.3f} nats per answer token")


if __name__ == "__main__":
    main()
