"""``hardneg losses``: list the registered losses and their hyper-parameters."""

from __future__ import annotations

import argparse

from hardneg.registry import list_losses, loss_hparams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="show only this loss")


def run(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list_losses()
    for name in names:
        params = ", ".join(f"{k}={v!r}" for k, v in loss_hparams(name).items())
        print(f"{name}: {params}")
    return 0
