"""The built-in losses, with the defaults of ``docs/methods.md``."""

from __future__ import annotations

from hardneg.losses.contrastive import ContrastiveLoss
from hardneg.losses.potential import PotentialLoss
from hardneg.registry import register_loss
from hardneg.strategies.importance import ImportanceNegatives
from hardneg.strategies.ring import RingNegatives
from hardneg.strategies.uniform import UniformNegatives
from hardneg.strategies.unremix import UnReMixNegatives


@register_loss("infonce")
def infonce(*, temperature: float = 0.5, check_inputs: bool = True) -> ContrastiveLoss:
    """InfoNCE / NT-Xent (SimCLR, Chen et al. 2020)."""
    return ContrastiveLoss(UniformNegatives(), temperature, 0.0, check_inputs)


@register_loss("debiased")
def debiased(
    *, temperature: float = 0.5, tau_plus: float = 0.1, check_inputs: bool = True
) -> ContrastiveLoss:
    """Debiased contrastive loss (Chuang et al., NeurIPS 2020)."""
    return ContrastiveLoss(UniformNegatives(), temperature, tau_plus, check_inputs)


@register_loss("hcl")
def hcl(
    *,
    temperature: float = 0.5,
    tau_plus: float = 0.1,
    beta: float = 1.0,
    detach_weights: bool = False,
    beta_anneal: str | None = None,
    anneal_epochs: int | None = None,
    check_inputs: bool = True,
) -> ContrastiveLoss:
    """Hard negative sampling (Robinson et al., ICLR 2021).

    ``anneal_epochs`` (the run's epoch count) reproduces the reference's integer stairs of
    ``epochs // 9`` epochs exactly; without it the 'down' schedule uses ninths of training.
    """
    strategy = ImportanceNegatives(beta, detach_weights, beta_anneal, anneal_epochs=anneal_epochs)
    return ContrastiveLoss(strategy, temperature, tau_plus, check_inputs)


@register_loss("ring")
def ring(
    *,
    temperature: float = 0.07,
    rho_out: float = 0.1,
    rho_in: float = 0.1,
    lower: float | None = None,
    upper: float | None = None,
    num_samples: int | None = None,
    anneal: str | None = None,
    anneal_until: float = 0.5,
    anneal_steps: int = 10,
    check_inputs: bool = True,
) -> ContrastiveLoss:
    """Ring / conditional negatives (Wu et al., ICLR 2021)."""
    strategy = RingNegatives(
        rho_out,
        rho_in,
        lower=lower,
        upper=upper,
        num_samples=num_samples,
        anneal=anneal,
        anneal_until=anneal_until,
        anneal_steps=anneal_steps,
    )
    return ContrastiveLoss(strategy, temperature, 0.0, check_inputs)


@register_loss("unremix")
def unremix(
    *,
    temperature: float = 0.5,
    tau_plus: float = 0.1,
    beta: float = 1.0,
    lambda_u: float = 1.0,
    lambda_d: float = 1.0,
    eps: float = 0.1,
    influence: str = "gradient_similarity",
    representativeness: str = "diversity",
    detach_weights: bool = False,
    check_inputs: bool = True,
) -> ContrastiveLoss:
    """UnReMix (Tabassum et al. 2022) — reconstruction, see :mod:`hardneg.strategies.unremix`."""
    strategy = UnReMixNegatives(
        beta, lambda_u, lambda_d, eps, influence, representativeness, detach_weights
    )
    return ContrastiveLoss(strategy, temperature, tau_plus, check_inputs)


@register_loss("potential")
def potential(
    *,
    temperature: float = 0.5,
    num_neighbors: int = 5,
    aug_weight: float = 0.5,
    a: float = 0.5,
    b: float = 0.0,
    clamp: float = 0.999,
    weighting: str = "hard",
    sample: str = "bernoulli",
    select_on: str = "cosine",
    aug_pairing: str = "matched",
    pool_as_negatives: bool = False,
    check_inputs: bool = True,
) -> PotentialLoss:
    """Potential-sample mining (Dong et al. 2023), see :mod:`hardneg.losses.potential`."""
    return PotentialLoss(
        temperature,
        num_neighbors,
        aug_weight,
        a,
        b,
        clamp,
        weighting,
        sample,
        select_on,
        aug_pairing,
        pool_as_negatives,
        check_inputs,
    )
