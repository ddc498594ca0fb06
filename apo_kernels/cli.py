"""The ``apo-kernels`` command line.

Each subcommand lives in its own module and registers itself through a ``register(subparsers)``
function that adds a parser and sets ``func`` (called with the parsed namespace, returning an
exit code). Heavy imports happen inside ``func`` so ``apo-kernels --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    from .commands import bench, check, model, train, tune

    parser = argparse.ArgumentParser(
        prog="apo-kernels",
        description="Fused LM-head log-probs and preference losses: check, benchmark, train.",
    )
    parser.add_argument("--version", action="version", version=f"apo-kernels {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, check, bench, model, tune):
        module.register(subparsers)
    try:
        from .clair import cli as clair_cli
    except ImportError:  # the CLAIR pipeline is optional until it lands
        clair_cli = None
    if clair_cli is not None:
        clair_cli.register(subparsers)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand's name: the first argument that is not an option (the top-level parser
    has no options taking a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _command(argv) == "check":
        # Triton picks interpreter or compiler once, at import, and building the parser may
        # import it (transformers does): decide for `check` before anything else runs.
        from .commands.check import prepare_interpreter

        prepare_interpreter()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    from ._optional import MissingDependency

    try:
        return int(args.func(args) or 0)
    except MissingDependency as exc:  # one line naming the extra, never a traceback
        print(f"apo-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `apo-kernels model | head`: the reader left, nothing is wrong
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - silences the interpreter's flush
        return 0


if __name__ == "__main__":
    sys.exit(main())
