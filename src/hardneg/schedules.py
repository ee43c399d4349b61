"""Training-progress schedules. Each is a pure function of ``progress`` (fraction of training done,
in [0, 1]), so a resumed run reproduces them exactly and nothing is hidden in module state."""

from __future__ import annotations

import math

from hardneg._checks import check_number


def check_progress(progress: float) -> float:
    return check_number("progress", progress, low=0.0, high=1.0)


def hcl_beta_down(
    beta: float, progress: float, n_steps: int = 9, *, epochs: int | None = None
) -> float:
    """HCL's ``anneal='down'`` schedule (joshr17/HCL, ``image/main.py``).

    The reference builds ``betas = iter(linspace(beta, 0, 9))`` and, after every epoch that is a
    multiple of ``epochs // 9``, sets ``beta = next(betas)``. Its first value is ``beta`` itself,
    so beta holds for the first two stairs, then drops by ``beta / 8`` per stair, reaching 0.

    Without ``epochs`` the stairs are ninths of training (``progress``), which equals the
    reference exactly when the number of epochs is a multiple of 9. With ``epochs`` (the run's
    epoch count) the reference's integer arithmetic is reproduced for any count: stairs of
    ``epochs // 9`` epochs, beta = 0 for whatever is left after the ninth change (the reference
    raises ``StopIteration`` where a tenth change would fall before the end; we stay at 0).
    """
    progress = check_progress(progress)
    if epochs is None:
        advanced = min(int(math.floor(progress * n_steps + 1e-9)), n_steps)
    else:
        epochs = int(check_number("epochs", epochs, low=1, integer=True))
        epoch = min(int(math.floor(progress * epochs + 1e-9)), epochs - 1)  # 0-based, running
        advanced = min(epoch // max(epochs // n_steps, 1), n_steps)
    if advanced <= 1:
        return beta
    return beta * (1.0 - (advanced - 1) / (n_steps - 1))


def ring_rho_out(
    final_rho_out: float, progress: float, *, until: float, kind: str = "linear", steps: int = 10
) -> float:
    """Ring's annealed outer fraction (Wu et al. 2021, Fig. 1c: "the support shrinks").

    ``rho_out`` goes from 1 (near-uniform sampling) to ``final_rho_out`` over the first ``until``
    fraction of training (the paper: the first 100 epochs) and stays there afterwards:

    * ``'linear'``: per optimiser step along the line from 1 to the final value (the authors'
      ``LinearThresholdPolicy``, which spaces its ``S`` values by ``1 / (S - 1)`` instead of
      ``1 / S``: at most one step's decrement apart);
    * ``'staircase'``: ``steps`` stairs of equal length with the values
      ``linspace(1, final_rho_out, steps)`` (the authors' ``StepThresholdPolicy`` with
      ``step_size = (1 - final) / (steps - 1)``; its defaults, final 0.1 and step 0.1, are
      ``steps = 10``). ``steps = 1`` holds 1 until ``until``.
    """
    progress = check_progress(progress)
    if until <= 0.0 or progress >= until:
        return final_rho_out
    frac = progress / until
    if kind == "staircase":
        if steps <= 1:
            return 1.0
        frac = min(math.floor(frac * steps + 1e-9), steps - 1) / (steps - 1)
    return 1.0 + (final_rho_out - 1.0) * frac
