"""Sub-commands of the ``hardneg`` CLI (one module each: ``add_arguments`` and ``run``).

A command's progress lines (``epoch=3 loss=...``, ``[2/9] hcl seed 0: training ...``) are INFO
records of the logger ``hardneg.status``, printed on stdout as they were with ``print``;
``--quiet`` sets that logger to WARNING. Result lines are printed with ``print`` and warnings
and errors go to stderr, so ``--quiet`` keeps them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

STATUS = logging.getLogger("hardneg.status")


class _StdoutHandler(logging.StreamHandler):
    """Writes each record's message to the ``sys.stdout`` of the moment (a redirect, a test's
    capture), not to the one there was when the handler was made; flushed line by line."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass  # StreamHandler.__init__ assigns one; the property always reads sys.stdout


_handler = _StdoutHandler()
_handler.setFormatter(logging.Formatter("%(message)s"))
STATUS.addHandler(_handler)
STATUS.propagate = False  # a root handler set up by the caller would print each line twice


def status_printer(args: argparse.Namespace) -> Callable[[str], None]:
    """The ``say`` / ``log`` callable a command hands to the library for its progress lines:
    ``STATUS.info``, with the logger set to WARNING when ``args.quiet`` (``--quiet``)."""
    STATUS.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    return STATUS.info


def show_progress(args: argparse.Namespace, asked: bool = True) -> bool:
    """Whether a command draws progress bars: ``asked`` (its own option) and not ``--quiet``."""
    return asked and not getattr(args, "quiet", False)
