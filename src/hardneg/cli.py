"""``hardneg`` command line: a thin dispatcher over :mod:`hardneg.commands`.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
modules are imported only when their command runs, so ``hardneg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hardneg.commands.demo", "compare every strategy on embedded data (the main job)"),
    "train": ("hardneg.commands.train", "train a model from a YAML config"),
    "eval": ("hardneg.commands.evaluate", "kNN and linear evaluation of a checkpoint"),
    "compare": ("hardneg.commands.compare", "train several strategies x seeds and compare them"),
    "losses": ("hardneg.commands.losses", "list the losses and their hyper-parameters"),
    "mine": ("hardneg.commands.mine", "mine hard negatives for (query, positive) text pairs"),
    "cache": ("hardneg.commands.cache", "list hardneg's cache folder with sizes, or --clear it"),
}
#: the commands that print progress: ``--quiet`` hides it (hardneg.commands.status_printer)
QUIET_COMMANDS = ("demo", "train", "eval", "compare", "mine")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hardneg",
        description="Hard-negative sampling for contrastive representation learning.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name, command=name)
        # arguments are declared by the command's module; importing it only for its parser
        # keeps each command's options next to its code
        importlib.import_module(module_name).add_arguments(p)
        if name in QUIET_COMMANDS:
            p.add_argument(
                "-q",
                "--quiet",
                action="store_true",
                help="no progress lines or bars: only the result, warnings and errors",
            )
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; a command's options may sit anywhere among its ``key=value`` overrides
    (``train a=1 --run-dir D b=2``). argparse's intermixed parsing does not support sub-parsers,
    so the command's own parser does it."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv and argv[0] in subparsers.choices:
        return subparsers.choices[argv[0]].parse_intermixed_args(argv[1:])
    return parser.parse_args(argv)  # --help, no or an unknown command: argparse's messages


def describe_os_error(err: OSError) -> str:
    """One line for a failed file operation: the file and why (``No space left on device``)."""
    text = str(err).strip()
    why = err.strerror or (text.splitlines()[0] if text else type(err).__name__)
    return f"{err.filename}: {why}" if err.filename else why


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on it)."""
    import select

    if not hasattr(select, "poll"):
        return True  # no poll (Windows): a broken pipe is most likely stdout's
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else list(argv))
    module = importlib.import_module(args._module)
    from hardneg import distributed

    # under torchrun a command joins the process group; the command line, which owns the
    # process, leaves it (a group that was there before the command belongs to the caller)
    owns_group = not distributed.is_initialized()
    succeeded = False
    try:
        code = module.run(args)
        succeeded = True
    except (ValueError, FileNotFoundError) as err:
        # user errors: one readable line, no stack trace
        print(f"hardneg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError as err:
        if not stdout_reader_gone():  # another pipe (a worker, a socket): a real error
            print(f"hardneg {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
            return 2
        # the reader of the output went away (`hardneg losses | head`): nothing to report, and
        # stdout is pointed at devnull so that Python's flush at exit does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as err:  # a full disk, a read-only file system, a folder we may not write
        print(f"hardneg {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # Ctrl-C: inside a training loop the trainer saved a checkpoint and its message says how
        # to continue (TrainingInterrupted); elsewhere (loading data, evaluating, drawing the
        # report) there is nothing to save, and a stack trace only hides that it was the user
        print(f"hardneg {args.command}: {str(err) or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        if owns_group:
            distributed.finish(wait=succeeded)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
