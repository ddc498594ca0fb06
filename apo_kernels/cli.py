"""The ``apo-kernels`` command line.

Each subcommand lives in its own module and registers itself through a ``register(subparsers)``
function that adds a parser and sets ``func`` (called with the parsed namespace, returning an
exit code). Heavy imports happen inside ``func`` so ``apo-kernels --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    from .commands import bench, check, train, tune

    parser = argparse.ArgumentParser(
        prog="apo-kernels",
        description="Fused LM-head log-probs and preference losses: check, benchmark, train.",
    )
    parser.add_argument("--version", action="version", version=f"apo-kernels {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, check, bench, tune):
        module.register(subparsers)
    try:
        from .clair import cli as clair_cli
    except ImportError:  # the CLAIR pipeline is optional until it lands
        clair_cli = None
    if clair_cli is not None:
        clair_cli.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
