"""The `titans` command line (also `python -m titans`).

Subcommands:
  demo   watch the neural long-term memory learn at test time (writes a PNG and a JSON file)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__

DESCRIPTION = """\
Titans: learning to memorize at test time (Behrouz, Zhong, Mirrokni; arXiv 2501.00663).
A PyTorch implementation of the neural long-term memory, whose weights keep learning while
it reads a sequence.

Run 'titans COMMAND --help' for the options of a command."""

DEMO_HELP = "watch the memory learn key->value pairs as it reads them (about 5 s on a CPU)"

DEMO_DESCRIPTION = """\
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'titans: error: ... (see titans --help)'."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="titans", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND",
                                parser_class=_Parser)
    demo = sub.add_parser("demo", help=DEMO_HELP, description=DEMO_DESCRIPTION,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", type=Path, default=Path("out/demo"), metavar="DIR",
                      help="folder for memory_demo.png and memory_demo.json (default: out/demo)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the random keys, values and initial memory (default: 0)")
    demo.set_defaults(func=_run_demo)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import format_table, memory_demo  # torch and matplotlib load only when needed

    t0 = time.perf_counter()
    result = memory_demo(args.out, seed=args.seed)
    print(format_table(result))
    print()
    print(f"Plot:    {result['png']}")
    print(f"Numbers: {result['json']}")
    print(f"Done in {time.perf_counter() - t0:.1f} s.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("titans: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # e.g. the output folder cannot be written
        print(f"titans {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
