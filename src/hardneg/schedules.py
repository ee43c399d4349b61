"""Training-progress schedules. Each is a pure function of ``progress`` (fraction of training done,
in [0, 1]), so a resumed run reproduces them exactly and nothing is hidden in module state."""

from __future__ import annotations

import math

from hardneg._checks import check_number


def check_progress(progress: float) -> float:
    return check_number("progress", progress, low=0.0, high=1.0)


def hcl_beta_down(beta: float, progress: float, n_steps: int = 9) -> float:
    """HCL's ``anneal='down'`` schedule (joshr17/HCL, ``image/main.py``).

    The reference builds ``betas = linspace(beta, 0, 9)`` and, after every ``epochs // 9`` epochs,
    sets ``beta = next(betas)``. Its first value is ``beta`` itself, so beta holds for the first two
    ninths of training, then drops by ``beta / 8`` every ninth, reaching 0 for the last ninth.
    """
    progress = check_progress(progress)
    advanced = min(int(math.floor(progress * n_steps + 1e-9)), n_steps)
    if advanced <= 1:
        return beta
    return beta * (1.0 - (advanced - 1) / (n_steps - 1))


def ring_rho_out(
    final_rho_out: float, progress: float, *, until: float, kind: str = "linear", steps: int = 10
) -> float:
    """Ring's annealed outer fraction (Wu et al. 2021, Fig. 1c: "the support shrinks").

    ``rho_out`` goes from 1 (near-uniform sampling) to ``final_rho_out`` over the first ``until``
    fraction of training (the paper: the first 100 epochs), linearly per optimiser step or as a
    staircase of ``steps`` equal steps; it stays at ``final_rho_out`` afterwards.
    """
    progress = check_progress(progress)
    if until <= 0.0 or progress >= until:
        return final_rho_out
    frac = progress / until
    if kind == "staircase":
        frac = math.floor(frac * steps) / steps
    return 1.0 + (final_rho_out - 1.0) * frac
