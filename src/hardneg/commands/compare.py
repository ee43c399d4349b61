"""`hardneg compare` (being built; see the open issues)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise ValueError("this command is not available yet")
