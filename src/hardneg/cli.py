"""``hardneg`` command line: a thin dispatcher over :mod:`hardneg.commands`.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
modules are imported only when their command runs, so ``hardneg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hardneg.commands.demo", "compare every strategy on embedded data (the main job)"),
    "train": ("hardneg.commands.train", "train a model from a YAML config"),
    "eval": ("hardneg.commands.evaluate", "kNN and linear evaluation of a checkpoint"),
    "compare": ("hardneg.commands.compare", "train several strategies x seeds and compare them"),
    "losses": ("hardneg.commands.losses", "list the losses and their hyper-parameters"),
    "mine": ("hardneg.commands.mine", "mine hard negatives for (query, positive) text pairs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hardneg",
        description="Hard-negative sampling for contrastive representation learning.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # arguments are declared by the command's module; importing it only for its parser
        # keeps each command's options next to its code
        importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        code = module.run(args)
    except (ValueError, FileNotFoundError) as err:
        # user errors: one readable line, no stack trace
        print(f"hardneg {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
