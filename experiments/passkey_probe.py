"""How far a model has got with the pass key (S-NIAH-1), beyond exact-match accuracy: the answer
tokens' loss under teacher forcing and the share of answer digits it predicts right, on generated
examples at one length.

    python experiments/passkey_probe.py --checkpoint out/pk_tf_probe --length 128 --examples 50

A model that has learned only the answer's format (five digits after " ") pays about ln 10 = 2.30
nats per digit and gets a tenth of the digits right; one that copies the needle pays ~0 and gets
them all. `key_influence` asks the question before that: does anything of the needle reach the
answer at all? It is the total variation between the first answer digit's predicted distributions
for the prompt and for the same prompt with every digit of the key changed (0: the answer ignores
the needle; 1: it follows it). Exact match (what `titans eval` scores) needs all five digits of the
greedy continuation right, so it stays at zero long after this probe shows the copy forming. Each
example is the pass-key prompt of `--length` tokens followed by its answer, read in one forward pass;
the needle's depth is drawn per example (seeded) unless `--depth` fixes it.

`--pad-to N` lays each example out as a training row of `data.task_mix` is: left-padded with the
document separator to N tokens (a row of seq_len S holds S + 1 tokens: `--pad-to 129` for
`data.seq_len=128`), the answer followed by the separator. `--pad-to` the length plus 8 puts a few
separators before the prompt (1 when the prompt has exactly `--length` tokens; make_niah's come in up
to a few short), close to `titans eval`'s one; without it the prompt starts at position 0.
A model trained on padded rows can score differently on these (the tiny transformer of docs/results.md's
probe: 100% of the digits at 112 tokens padded, 78% plain; the tiny MAC: 90% padded, 39% after a few
separators, its answers tied to where they fall in a segment).

`prompt_loss_nats_per_token` is the next-token loss on the prompt itself: a model that cannot read
a prompt of this length (filler it never saw, positions past its training length) shows it there
before any question of retrieval.

`per_example` lists each example's seed, where its key sits in the row (`key_start`, `key_end`: the
first and last token of the key's digits, exact for the byte tokenizer), its digits right, answer
loss and key influence. For MAC it adds `key_offset`, where the key starts in its segment
(`key_start % model.segment_len`, segments counted from the row's first token), and the summary
`by_key_offset` gives digits right and key influence per eighth of the segment (the tiny pass-key
MAC reads keys that start in the first 45 of its 64 segment tokens and loses those that start
later; docs/results.md, "The same MAC at 2K tokens on an H100").
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def probe(checkpoint: str, length: int, examples: int, seed: int = 0, pad_to: int = 0,
          depth: float | None = None, forget_scale: float | None = None) -> dict:
    from titans.checkpoint import load
    from titans.tasks.niah import make_niah

    model, tokenizer = load(checkpoint)
    if forget_scale is not None and forget_scale != model.config.forget_scale:
        model.set_forget_scale(forget_scale)
    sep = tokenizer.eos_id

    def row(ids: list[int], answer: list[int]) -> list[int]:
        """The prompt's tokens, left-padded with separators so that prompt + answer fill `pad_to`."""
        return [sep] * max(0, pad_to - len(ids) - len(answer)) + ids

    nats, tokens, digits, right, exact, influence = 0.0, 0, 0, 0, 0, 0.0
    segment = model.config.segment_len if model.config.variant == "mac" else 0
    per_example: list[dict] = []
    prompt_nats, prompt_tokens = 0.0, 0
    by_start: dict[str, list[float]] = {}
    digit_hits: list[list[bool]] = []  # per example, the teacher-forced hit of each digit of the key
    with torch.no_grad():
        for i in range(examples):
            ex = make_niah("single_1", length, depth, tokenizer=tokenizer, seed=seed + i)
            key = ex.answer.strip()
            # the same prompt with every digit of the key changed (d -> d + 5 mod 10)
            changed = ex.prompt.replace(key, "".join(str((int(c) + 5) % 10) for c in key))
            answer = tokenizer.encode(ex.answer)
            if pad_to:  # the training row's layout: separators, prompt, answer, separator
                answer.append(sep)
            ids = tokenizer.encode(ex.prompt)
            prompt, prompt2 = row(ids, answer), row(tokenizer.encode(changed), answer)
            at = ex.prompt.index(key)  # the key's digits, as token positions in the row
            key_start = len(prompt) - len(ids) + len(tokenizer.encode(ex.prompt[:at]))
            key_end = len(prompt) - len(ids) + len(tokenizer.encode(ex.prompt[:at + len(key)])) - 1
            logits, _ = model(torch.tensor([prompt + answer]))
            digit = torch.tensor([tokenizer.decode([t]).strip().isdigit() for t in answer])
            j = int(digit.nonzero()[0])  # the first digit of the answer
            first = logits[0, len(prompt) - 1 + j].float().softmax(-1)
            first2 = model(torch.tensor([prompt2 + answer[:j]]))[0][0, -1].float().softmax(-1)
            example_influence = 0.5 * (first - first2).abs().sum().item()
            influence += example_influence
            by_start.setdefault(key[0], []).append(first[answer[j]].item())
            # the logits that predict each answer token: positions len(prompt) - 1 ... end - 1
            pred = logits[0, len(prompt) - 1:-1].float()
            target = torch.tensor(answer)
            example_nats = torch.nn.functional.cross_entropy(pred, target, reduction="sum").item()
            nats += example_nats
            hits = pred.argmax(-1) == target
            example_digits, example_right = int(digit.sum()), int((hits & digit).sum())
            digits += example_digits
            right += example_right
            digit_hits.append(hits[digit].tolist())
            record = {"seed": seed + i, "key_start": key_start, "key_end": key_end,
                      "digits_right": example_right, "digits": example_digits,
                      "answer_loss_nats_per_token": example_nats / len(answer),
                      "key_influence": example_influence}
            if segment:
                record["key_offset"] = key_start % segment
            per_example.append(record)
            exact += int(hits.all())
            tokens += len(answer)
            # the prompt's own tokens (after the padding; the first has no context of its own)
            start = len(prompt) - len(ids)
            read = logits[0, start:len(prompt) - 1].float()
            prompt_nats += torch.nn.functional.cross_entropy(read, torch.tensor(prompt[start + 1:]),
                                                             reduction="sum").item()
            prompt_tokens += len(prompt) - 1 - start
    return {
        "checkpoint": checkpoint,
        "length": length,
        "pad_to": pad_to,
        "depth": depth,
        "forget_scale": model.config.forget_scale,
        "examples": examples,
        "answer_loss_nats_per_token": nats / tokens,
        "digit_accuracy_teacher_forced": right / digits,
        "all_answer_tokens_right_teacher_forced": exact / examples,
        "format_floor_nats_per_token": 5 * math.log(10) * examples / tokens,
        # next-token loss on the prompt itself (haystack, needle, question): whether the model reads
        # the text of a prompt of this length at all, before any question of retrieval
        "prompt_loss_nats_per_token": prompt_nats / prompt_tokens,
        # total variation between the first answer digit's predicted distributions for the prompt and
        # for the prompt with the key's digits changed: 0 if nothing of the needle reaches the
        # answer (whatever the format learned), 1 if the prediction follows the key entirely
        "key_influence": influence / examples,
        # the probability given to the key's first digit, by that digit: which keys get across
        "first_digit_probability_by_value": {d: sum(v) / len(v) for d, v in sorted(by_start.items())},
        # teacher-forced accuracy of the key's 1st, 2nd, ... digit: whether the key is lost as a whole
        # or the start is found and the continuation is not
        "digit_accuracy_by_position": [sum(h) / len(h) for h in zip(*digit_hits)],
        **({"by_key_offset": by_key_offset(per_example, segment)} if segment else {}),
        "per_example": per_example,
    }


def by_key_offset(per_example: list[dict], segment: int, bins: int = 8) -> list[dict]:
    """Digits right and key influence of the examples whose key starts in each of `bins` equal
    stretches of the segment (offsets [lo, hi)); stretches without examples are left out."""
    out = []
    for b in range(bins):
        lo, hi = b * segment // bins, (b + 1) * segment // bins
        group = [r for r in per_example if lo <= r["key_offset"] < hi]
        if group:
            out.append({"offsets": [lo, hi], "examples": len(group),
                        "digit_accuracy_teacher_forced": (sum(r["digits_right"] for r in group)
                                                          / sum(r["digits"] for r in group)),
                        "key_influence": sum(r["key_influence"] for r in group) / len(group)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run folder or a checkpoints/step_* folder")
    p.add_argument("--length", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--examples", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pad-to", type=int, default=0, metavar="N",
                   help="left-pad each example with the document separator to N tokens, as training rows are")
    p.add_argument("--depth", type=float, default=None,
                   help="the needle's depth in the context, 0 (start) to 1 (end); default: drawn per example")
    p.add_argument("--forget-scale", type=float, default=None, metavar="S",
                   help="read with every memory's forgetting gate multiplied by S in [0, 1] "
                        "(default: as trained, 1 unless the run set model.forget_scale)")
    args = p.parse_args()
    if args.forget_scale is not None and not 0 <= args.forget_scale <= 1:
        p.error(f"--forget-scale must lie in [0, 1], got {args.forget_scale}")
    if args.length < 100 or args.examples < 1 or args.pad_to < 0:
        p.error("--length must be >= 100 (the needle and question fit), --examples >= 1, --pad-to >= 0")
    if args.depth is not None and not 0 <= args.depth <= 1:
        p.error(f"--depth must lie in [0, 1], got {args.depth}")
    out = probe(args.checkpoint, args.length, args.examples, args.seed, args.pad_to, args.depth,
                args.forget_scale)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
