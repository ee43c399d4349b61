"""``hardneg losses``: every registered loss with its hyper-parameters, defaults and meanings."""

from __future__ import annotations

import argparse

from hardneg.registry import describe_loss, list_losses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="show only this loss")


def run(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list_losses()
    print("\n\n".join(describe_loss(name) for name in names))
    return 0
