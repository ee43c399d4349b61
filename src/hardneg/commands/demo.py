"""``hardneg demo``: every strategy on the embedded mnist1d data, one seed, a few minutes on a CPU.

It is ``hardneg compare`` with a dedicated short schedule (:data:`DEMO_OVERRIDES` on top of the
packaged mnist1d config): every registered strategy (``hardneg losses``) is trained with SimCLR and the same encoder, then
evaluated on frozen features (weighted kNN and linear probe), and one comparison report is written.
One strategy (``--reseed``, InfoNCE by default) is trained a second time with seed 1: how far its
accuracy moves measures the seed noise, and the closing verdict says which differences exceed it
and what the diagnostics show about each strategy's negatives.
The schedule is sized to finish within 5 minutes on 2 CPU cores; the README lists what it prints.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from hardneg.commands.compare import (
    closing_line,
    compare,
    default_out,
    parse_strategies,
    print_verdict,
    resumable,
)

DEMO_DATASET = "mnist1d"
DEMO_OVERRIDES = [
    "train.epochs=8",
    "train.batch_size=256",
    "train.knn_every=2",
    "train.diagnostics_every=5",
    "train.checkpoint_every=0",
]
DEMO_TSNE_POINTS = 600


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--modality",
        choices=("image", "graph", "text"),
        default="image",
        help="image: mnist1d (default); graph: motif graphs (needs hardneg[graph]); text: "
        "MiniLM fine-tuned on gensim's Lee corpus, 3 seeds (needs hardneg[text])",
    )
    parser.add_argument("--out", help="output folder (default runs/demo-TIME)")
    parser.add_argument(
        "--strategies",
        help="comma-separated subset to run (default: every registered loss, see hardneg losses)",
    )
    parser.add_argument(
        "--reseed",
        default=None,  # None: infonce for images; text and graphs measure the noise otherwise
        metavar="STRATEGY",
        help="image demo: train this strategy once more with seed 1 to measure the seed noise "
        "(default infonce; 'none' to skip)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"extra config overrides on top of the demo's ({' '.join(DEMO_OVERRIDES)})",
    )


def run(args: argparse.Namespace) -> int:
    modality = getattr(args, "modality", "image")
    if modality != "image" and getattr(args, "reseed", None) is not None:
        # it was ignored without a word: the text demo runs 3 seeds of every strategy
        raise ValueError(
            f"--reseed applies to the image demo only, not to --modality {modality}"
            + (
                " (it runs seeds 0, 1, 2 of every strategy; set seeds=0,1 to change them)"
                if modality == "text"
                else ""
            )
        )
    if modality == "graph":
        from hardneg.graph.demo import run_cli

        return run_cli(args)
    if getattr(args, "modality", "image") == "text":
        from hardneg.text.cli import run_demo

        return run_demo(args)
    out = Path(args.out) if args.out else default_out("demo")
    strategies = parse_strategies(args.strategies)
    choice = "infonce" if args.reseed is None else args.reseed
    reseed = [] if choice in ("none", "") else [choice]
    if reseed and reseed[0] not in strategies:
        raise ValueError(
            f"--reseed {choice} is not among --strategies ({', '.join(strategies)}); "
            "name one of them, or --reseed none"
        )
    from hardneg.commands import status_printer

    with resumable(out):  # Ctrl-C: one line saying how to continue
        outcome = compare(
            dataset=DEMO_DATASET,
            strategies=strategies,
            seeds=[0],
            out=out,
            overrides=[*DEMO_OVERRIDES, *args.overrides],
            tsne_points=DEMO_TSNE_POINTS,
            reseed=reseed,
            command="hardneg " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            say=status_printer(args),
        )
    print()
    print(outcome.table)
    print_verdict(outcome.verdict)
    print(f"\n{closing_line(outcome)}")
    return 0 if not outcome.failed else 1
