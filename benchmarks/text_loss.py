"""Time of the sentence-transformers loss step of every strategy against
``MultipleNegativesRankingLoss``, the loss a text-retrieval user would otherwise take.

Both losses get the same column embeddings ``[anchor, positive, negative_1..k]`` (``[B, d]``
each, requiring gradients) and run ``compute_loss_from_embeddings`` plus the backward pass to
the embeddings: the encoder is left out, so the table measures the losses alone (in training
the transformer's forward and backward dominate and every ratio moves towards 1). The layout is
MNRL's: each anchor against every positive and hard negative of the batch, logits ``scale *
cos`` (``scale = 20``). ``hardneg``'s loss is :class:`~hardneg.integrations.sentence_transformers.
HardNegativeLoss` with the registry's defaults and ``mask_duplicates`` off (no token ids here;
MNRL masks nothing either). Strategies that reject the retrieval layout (``potential``) are
listed as skipped.

Rounds are interleaved (every loss once per round, the order reversed every other round); the
table gives MNRL's median time per step and, per strategy, the median over rounds of its time
divided by MNRL's in the same round. Before timing, ``infonce``'s loss and gradients are checked
equal to MNRL's on the same embeddings (the comparison is of the same computation).

Examples:
    python benchmarks/text_loss.py                                  # B = 64, 128, 256; k = 0, 1, 3
    python benchmarks/text_loss.py --batch-sizes 128 --negatives 3 --strategies infonce,hcl
    python benchmarks/text_loss.py --directions \
        query_to_doc,query_to_query,doc_to_query,doc_to_doc          # GTE's joint partition
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

import hardneg
from hardneg.integrations.sentence_transformers import HardNegativeLoss


def _mnrl_class():
    try:  # sentence-transformers >= 6 moved the losses; the old path still works with a warning
        from sentence_transformers.sentence_transformer.losses import (
            MultipleNegativesRankingLoss,
        )
    except ImportError:  # pragma: no cover - older sentence-transformers
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    return MultipleNegativesRankingLoss


class NoEncoder(nn.Module):
    """Stands in for the model: both losses only read embeddings given to them directly."""

    def forward(self, features):  # pragma: no cover - never called
        raise RuntimeError("the benchmark passes embeddings, not features")


def make_losses(
    strategies: list[str],
    scale: float,
    directions: tuple[str, ...] | None = None,
    partition_mode: str | None = None,
) -> tuple[dict[str, nn.Module], list[str]]:
    """``{"mnrl": MNRL, name: HardNegativeLoss}`` and the strategies that reject the layout
    (or, with several directions in one partition, positives of their own). ``directions`` /
    ``partition_mode``: MNRL's, given to both (None: its defaults)."""
    model = NoEncoder()
    partition = {}
    if directions is not None:
        partition["directions"] = directions
    if partition_mode is not None:
        partition["partition_mode"] = partition_mode
    losses: dict[str, nn.Module] = {"mnrl": _mnrl_class()(model, scale=scale, **partition)}
    skipped = []
    for name in strategies:
        try:
            losses[name] = HardNegativeLoss(
                model, name, scale=scale, mask_duplicates=False, **partition
            )
        except ValueError as err:
            if "retrieval layout" not in str(err) and "positives of its own" not in str(err):
                raise
            skipped.append(name)
    return losses, skipped


def columns(batch: int, negatives: int, dim: int, seed: int) -> list[torch.Tensor]:
    """``[anchor, positive, negative_1..k]`` embeddings, the positives near their anchors."""
    g = torch.Generator().manual_seed(seed)
    anchor = torch.randn(batch, dim, generator=g)
    cols = [anchor, anchor + 0.5 * torch.randn(batch, dim, generator=g)]
    cols += [anchor + 1.0 * torch.randn(batch, dim, generator=g) for _ in range(negatives)]
    return [c.requires_grad_() for c in cols]


def step(loss: nn.Module, cols: list[torch.Tensor]) -> torch.Tensor:
    """One loss from the embeddings and its backward pass (gradients cleared first)."""
    for c in cols:
        c.grad = None
    if isinstance(loss, HardNegativeLoss):
        value = loss.compute_loss_from_embeddings(cols)
    else:
        value = loss.compute_loss_from_embeddings(cols, None)
    value.backward()
    return value


def check_same_computation(losses: dict[str, nn.Module], cols: list[torch.Tensor]) -> None:
    """``infonce`` equals MNRL in value and gradients on these embeddings (else the ratios
    would compare different work)."""
    if "infonce" not in losses:
        return
    out = []
    for name in ("mnrl", "infonce"):
        value = step(losses[name], cols)
        out.append((value.detach(), [c.grad.clone() for c in cols]))
    (va, ga), (vb, gb) = out
    torch.testing.assert_close(vb, va, rtol=1e-4, atol=1e-5)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)


def time_cell(
    losses: dict[str, nn.Module], cols: list[torch.Tensor], rounds: int, warmup: int
) -> tuple[float, dict[str, float]]:
    """MNRL's median seconds per step and every loss's median ratio to it (same round)."""
    names = list(losses)
    for _ in range(warmup):
        for name in names:
            step(losses[name], cols)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            step(losses[name], cols)
            times[name].append(time.perf_counter() - start)
    base = times["mnrl"]
    ratios = {
        name: statistics.median(a / b for a, b in zip(v, base))
        for name, v in times.items()
        if name != "mnrl"
    }
    return statistics.median(base), ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="64,128,256")
    parser.add_argument("--negatives", default="0,1,3", help="hard negatives per row (k)")
    parser.add_argument("--dim", type=int, default=384, help="all-MiniLM-L6-v2's width")
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument("--strategies", default=None, help="default: every registered one")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--directions",
        default=None,
        help="MNRL's directions for both losses, comma-separated (e.g. query_to_doc,"
        "query_to_query,doc_to_query,doc_to_doc: GTE's joint partition); default: MNRL's",
    )
    parser.add_argument("--partition-mode", default=None, help="joint or per_direction")
    args = parser.parse_args(argv)
    directions = (
        None
        if args.directions is None
        else tuple(d.strip() for d in args.directions.split(",") if d.strip())
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    strategies = (
        hardneg.list_losses()
        if args.strategies is None
        else [s.strip() for s in args.strategies.split(",") if s.strip()]
    )
    losses, skipped = make_losses(strategies, args.scale, directions, args.partition_mode)
    names = [n for n in losses if n != "mnrl"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPU(s), {torch.get_num_threads()} "
        f"thread(s), d = {args.dim}, scale {args.scale:g}, {args.rounds} interleaved rounds per "
        f"cell, median; load average at start {load:.2f}"
        + (f"; directions {','.join(directions)}" if directions else "")
        + (f", partition {args.partition_mode}" if args.partition_mode else "")
    )
    header = ["B", "k", "MNRL (ms)", *(f"{n} (x)" for n in names)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for b in [int(x) for x in args.batch_sizes.split(",") if x.strip()]:
        for k in [int(x) for x in args.negatives.split(",") if x.strip()]:
            cols = columns(b, k, args.dim, args.seed)
            check_same_computation(losses, cols)
            base, ratios = time_cell(losses, cols, args.rounds, args.warmup)
            row = f"| {b} | {k} | {base * 1e3:.2f} | " + " | ".join(
                f"{ratios[n]:.2f}" for n in names
            )
            lines.append(row + " |")
            print(lines[-1], flush=True)
    print()
    print("Time of one loss step (embeddings -> loss -> gradients) relative to MNRL's")
    print()
    print("\n".join(lines))
    if skipped:
        print(f"\nskipped (reject the retrieval layout or the partition): {', '.join(skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
