"""The closing verdict of a comparison: which strategy did better, whether the seed noise lets
the runs say so, and what the training diagnostics show about each strategy's negatives.

The noise is measured where the runs allow it: the pooled per-seed standard deviation of the
strategies run with several seeds, else the spread of a re-seeded run (``hardneg demo`` trains
one strategy a second time with another seed for this). It is never taken below
:data:`MIN_SEED_STD`: one re-seed is itself a noisy estimate, and per-seed standard deviations of
1-3 kNN points are what the 3-seed mnist1d comparison in the README shows. Two strategies are
told apart only when their mean kNN top-1 differ by more than two standard deviations of that
difference.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hardneg.report.runs import history_column
from hardneg.report.table import RunRecord, run_values

MIN_SEED_STD = 1.0  # kNN top-1 points; see the module docstring


def counted(number: int, noun: str) -> str:
    """``'1 epoch'``, ``'3 epochs'``: a count and its noun, plural unless the count is 1."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


@dataclass
class Noise:
    std: float  # per-run standard deviation of kNN top-1 (points), floored
    source: str  # one sentence: where it comes from
    measured: bool = True  # False: only the assumed floor (one seed, no re-seed)


def seed_noise(records: Sequence[RunRecord], reseeded: Sequence[RunRecord] = ()) -> Noise:
    """Per-run standard deviation of kNN top-1 from the runs themselves (see the module doc)."""
    by_strategy: dict[str, list[float]] = {}
    for record in [*records, *reseeded]:
        value = run_values(record)["knn_top1"]
        if not math.isnan(value):
            by_strategy.setdefault(record.strategy, []).append(value)
    spread = {s: v for s, v in by_strategy.items() if len(v) > 1}
    floor = (
        f"taken as at least {MIN_SEED_STD:g} point (per-seed standard deviations of 1-3 kNN "
        "points are usual at this scale)"
    )
    if not spread:
        return Noise(
            MIN_SEED_STD,
            f"not measured (one seed per strategy, no re-seeded run); {floor}",
            measured=False,
        )
    pooled = math.sqrt(statistics.fmean(statistics.variance(v) for v in spread.values()))
    if reseeded and all(len(v) == 2 for v in spread.values()):
        linear: dict[str, list[float]] = {}
        for record in [*records, *reseeded]:
            value = run_values(record)["linear_top1"]
            if not math.isnan(value):
                linear.setdefault(record.strategy, []).append(value)
        parts = [
            f"re-training {s} with another seed moved its kNN top-1 from {v[0]:.2f} to "
            f"{v[1]:.2f} ({abs(v[1] - v[0]):.2f} points from the seed alone"
            + (
                f"; linear top-1 {linear[s][0]:.2f} -> {linear[s][1]:.2f})"
                if len(linear.get(s, [])) == 2
                else ")"
            )
            for s, v in spread.items()
        ]
        source = "; ".join(parts)
    else:
        runs = sorted({len(v) for v in spread.values()})
        source = (
            f"pooled per-seed standard deviation {pooled:.2f} points over "
            f"{'/'.join(map(str, runs))} seeds of {len(spread)} strategies"
        )
    if pooled < MIN_SEED_STD:
        source += f"; {floor}"
    return Noise(max(pooled, MIN_SEED_STD), source)


def verdict_lines(
    records: Sequence[RunRecord],
    *,
    reseeded: Sequence[RunRecord] = (),
    available_negatives: int | Mapping[str, int | None] | None = None,
    epochs: int | None = None,
    dataset: str | None = None,
) -> list[str]:
    """Markdown bullet lines (``- ...``, sub-points indented) of the verdict.

    ``dataset``: the compared data set, named in the advice to re-run with several seeds
    (None: mnist1d, the demo's).

    ``available_negatives``: how many negatives each anchor has, one number for every strategy
    or one per strategy (a strategy whose diagnostics describe another set of columns, such as
    potential's mined term: the other keys only)."""
    groups: dict[str, list[dict[str, float]]] = {}
    histories: dict[str, list] = {}
    for record in records:
        groups.setdefault(record.strategy, []).append(run_values(record))
        histories.setdefault(record.strategy, []).append(record.history)
    if not groups:
        return []

    def mean(strategy: str, key: str) -> float:
        vals = [r[key] for r in groups[strategy] if not math.isnan(r[key])]
        return statistics.fmean(vals) if vals else math.nan

    knn = {s: mean(s, "knn_top1") for s in groups}
    ranked = sorted((s for s in groups if not math.isnan(knn[s])), key=lambda s: -knn[s])
    if not ranked:
        return ["- no run has a kNN top-1: nothing to compare"]
    noise = seed_noise(records, reseeded)
    best = ranked[0]
    lines = [f"- **Best kNN top-1: {_leaders(knn)}**" + _best_linear(groups, mean)]
    seeds = {s: len(v) for s, v in groups.items()}
    n_best = seeds[best]
    if len(ranked) > 1:
        one = max(seeds.values()) == 1
        gap = 2 * noise.std * math.sqrt(1 / n_best + 1 / min(seeds.values()))
        lines.append(
            f"- Seed noise: {noise.source}. "
            # one sentence: "With one seed ..., a kNN difference" or "A kNN difference"
            + (
                f"With one seed{' and ' + counted(epochs, 'epoch') if epochs else ''} per strategy, a"
                if one
                else "A"
            )
            + f" kNN difference under about {gap:.1f} points (two standard deviations of the "
            "difference of two means) is not evidence that one strategy is better."
        )
        level = [
            s
            for s in ranked[1:]
            if knn[best] - knn[s] <= 2 * noise.std * math.sqrt(1 / n_best + 1 / seeds[s])
        ]
        behind = [s for s in ranked[1:] if s not in level]
        if level:
            lines.append(
                f"- Level with {best} within the noise: {', '.join(level)}"
                + ("; these runs cannot rank them." if len(level) + 1 == len(ranked) else ".")
            )
        for s in behind:
            lines.append("- " + _behind(s, best, knn, mean, histories[s], one, noise.measured))
        if one:
            # the advice names the data set compared: a CIFAR comparison is not ranked by
            # re-running mnist1d
            schedule = (
                "(20 epochs)" if dataset in (None, "mnist1d") else "(the packaged config's epochs)"
            )
            lines.append(
                "- To rank strategies, run several seeds and the full schedule: "
                f"`hardneg compare --dataset {dataset or 'mnist1d'} --seeds 3` {schedule}."
            )
    lines += _negatives(groups, mean, available_negatives)
    return lines


def _leaders(scores: Mapping[str, float]) -> str:
    """``'hcl (81.00%)'``, or every strategy level with the top at the printed precision,
    ``'infonce, hcl (tied, 12.00%)'``: naming one of equal scores as the best misleads."""
    values = {s: v for s, v in scores.items() if not math.isnan(v)}
    top = round(max(values.values()), 2)
    tied = [s for s, v in values.items() if round(v, 2) == top]
    if len(tied) == 1:
        return f"{tied[0]} ({top:.2f}%)"
    return f"{', '.join(tied)} (tied, {top:.2f}%)"


def _best_linear(groups, mean) -> str:
    linear = {s: mean(s, "linear_top1") for s in groups}
    linear = {s: v for s, v in linear.items() if not math.isnan(v)}
    if not linear:
        return ""
    return f"; best linear top-1: {_leaders(linear)}"


def _behind(strategy, best, knn, mean, histories, one_seed: bool, measured: bool) -> str:
    text = f"{strategy} is {knn[best] - knn[strategy]:.1f} kNN points behind {best}, more than "
    text += "the noise" if measured else "the assumed noise (short runs can vary more)"
    lin_s, lin_b = mean(strategy, "linear_top1"), mean(best, "linear_top1")
    if not (math.isnan(lin_s) or math.isnan(lin_b)):
        diff = lin_b - lin_s
        text += f" ({abs(diff):.1f} {'behind' if diff >= 0 else 'ahead'} on the linear probe)"
    rise = _last_rise(histories)
    if rise is not None and rise > 0:
        text += (
            f". Its kNN monitor was still rising when training stopped (+{rise:.1f} points "
            "over the last interval): it may learn more slowly rather than worse"
        )
        if one_seed:
            text += "; one seed of a short schedule cannot tell which"
    elif one_seed:
        text += "; with one seed, confirm it with several seeds before concluding"
    return text + "."


def _last_rise(histories) -> float | None:
    """Mean over runs of the last step of the kNN monitor (last minus previous value)."""
    rises = []
    for history in histories:
        _, values = history_column(history, "knn_top1")
        if len(values) >= 2:
            rises.append(float(values[-1] - values[-2]))
    return statistics.fmean(rises) if rises else None


def _negatives(groups, mean, available_negatives) -> list[str]:
    """One sub-bullet per strategy: how many negatives count, same-class mass, hardness."""
    rows = {
        s: (
            mean(s, "effective_negatives"),
            mean(s, "false_negative_mass"),
            mean(s, "mean_negative_similarity"),
        )
        for s in groups
    }
    if all(math.isnan(v[0]) and math.isnan(v[1]) for v in rows.values()):
        return []
    uniform = rows.get("infonce", (math.nan, math.nan, math.nan))[1]
    per_strategy = isinstance(available_negatives, Mapping)
    shared = None if per_strategy else available_negatives
    lines = [
        "- What the diagnostics show about the negatives (the last epoch that logged them; labels "
        "used for analysis "
        "only; *effective negatives* = (sum w)^2 / sum w^2 of the sampling weights"
        + (f", out of the {shared} negatives each anchor has" if shared else "")
        + (
            ", out of the negatives each anchor has in the term they describe"
            if per_strategy
            else ""
        )
        + "):"
    ]
    for s, (eff, fn, cos) in rows.items():
        available = available_negatives.get(s) if per_strategy else shared
        parts = []
        if not math.isnan(eff):
            if available and eff > 1.01 * available:
                parts.append(f"{eff:.0f} effective negatives, more than the {available} that "
                             "exist: it counts weighted copies of some negatives")  # fmt: skip
            elif available and eff >= 0.99 * available:
                parts.append(f"uniform over all {available} negatives")
            elif available:
                parts.append(
                    f"{eff:.0f} effective negatives ({eff / available:.0%} of {available}): "
                    "its weight sits on a subset"
                )
            else:
                parts.append(f"{eff:.0f} effective negatives")
        if not math.isnan(fn):
            text = f"same-class (false-negative) mass {fn:.3f}"
            if not math.isnan(uniform) and s != "infonce" and uniform > 0:
                ratio = fn / uniform
                text += f", {ratio:.2f}x InfoNCE's uniform {uniform:.3f}"
                if ratio > 1.1:
                    text += ": the harder negatives it favours are more often same-class"
                elif ratio < 0.9:
                    text += ": it avoids same-class negatives"
            parts.append(text)
        if not math.isnan(cos):
            parts.append(f"mean cosine to the anchor {cos:+.2f}")
        lines.append(f"  - {s}: " + "; ".join(parts))
    return lines
