"""The answer-token loss of a model that knows each bAbI task's answer distribution but nothing of
the story: the floor that a BABILong fine-tune must get below before it uses the facts at all.

    python experiments/answer_prior.py --stories 3000

For each QA task, the entropy (nats) of its answer over generated stories, the mean number of
answer tokens (byte tokens of " <word>", as training scores them) and the accuracy of always
giving the most common answer; then the mix's loss per answer token (total entropy over total
tokens, the tasks drawn equally often, as data.tasks draws them).
"""

from __future__ import annotations

import argparse
import collections
import math


def answer_prior(stories: int) -> dict:
    from titans.data.tokenizer import ByteTokenizer
    from titans.tasks.babilong import make_babi

    tok = ByteTokenizer()
    rows, nats, tokens = [], 0.0, 0.0
    for qa in range(1, 6):
        counts = collections.Counter(make_babi(qa, seed)[2] for seed in range(stories))
        probs = [c / stories for c in counts.values()]
        entropy = -sum(p * math.log(p) for p in probs)
        n_tok = sum(c * len(tok.encode(" " + a)) for a, c in counts.items()) / stories
        rows.append({"qa": qa, "answers": len(counts), "entropy_nats": entropy, "answer_tokens": n_tok,
                     "majority_accuracy": max(probs)})
        nats, tokens = nats + entropy, tokens + n_tok
    return {"stories": stories, "rows": rows, "mix_loss_per_answer_token": nats / tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stories", type=int, default=3000)
    out = answer_prior(p.parse_args().stories)
    print("| task | answers | entropy (nats) | answer tokens | majority accuracy |")
    print("|---|---:|---:|---:|---:|")
    for r in out["rows"]:
        print(f"| QA{r['qa']} | {r['answers']} | {r['entropy_nats']:.3f} | {r['answer_tokens']:.2f} "
              f"| {r['majority_accuracy']:.3f} |")
    print(f"\nmix: {out['mix_loss_per_answer_token']:.3f} nats per answer token "
          f"({out['stories']} stories per task)")


if __name__ == "__main__":
    main()
