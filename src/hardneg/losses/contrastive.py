"""``ContrastiveLoss``: contrast set -> strategy -> objective, in one ``nn.Module``.

Call forms (embeddings need not be normalised):

* ``loss(z1, z2)``: two views ``[N, d]``; in-batch negatives, averaged over all ``2N`` anchors
  (SimCLR). ``extra_views=[z3, ...]`` adds views (each anchor then has ``V - 1`` positives);
  ``ids=[N]`` masks duplicates.
* ``loss(q, k, negatives=pool)``: queries, their positive keys and an external pool ``[K, d]``
  (MoCo queue, memory bank); averaged over the ``N`` queries; ``exclude_index=[N]`` masks each
  query's own bank row. A per-anchor pool ``negatives=[N, K, d]`` gives each query its own ``K``
  rows (IR's per-anchor noise draws from a memory bank).
* ``loss(anchor, positive, hard_negatives=neg)``: retrieval batches, ``neg [N, h, d]``; every
  positive and hard negative of the batch is a candidate of every anchor
  (``MultipleNegativesRankingLoss`` layout), averaged over the ``N`` anchors. ``h = 0``
  (``neg`` of shape ``[N, 0, d]``) is the pair layout: the other positives are the negatives.
  ``ids=[N (1 + h)]`` (one per candidate: the positives, then the hard negatives row-major)
  masks every candidate with the same id as the anchor's positive; ``anchor_ids=[N]`` (with
  ``ids``) also every candidate with the anchor's own id. ``false_negatives=[N, N (1 + h)]``
  (bool, same column order) masks the candidates known not to be negatives of an anchor (other
  relevant documents of a query, a guide model's verdict: :func:`hardneg.contrast.guided_false_negatives`).

Example:
    >>> import torch, hardneg
    >>> loss_fn = hardneg.create_loss("hcl", beta=1.0, tau_plus=0.1, temperature=0.5)
    >>> z1, z2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
    >>> loss = loss_fn(z1, z2)
    >>> loss.backward()
    >>> out = loss_fn(z1, z2, labels=torch.arange(8) % 2, return_diagnostics=True)
    >>> round(out.diagnostics.summary()["effective_negatives"], 1) <= 14
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hardneg._checks import (
    check_choice,
    check_embeddings,
    check_index,
    check_labels,
    check_number,
    check_same_shape,
    closest_hint,
)
from hardneg.contrast import (
    ContrastSet,
    build_contrast,
    in_batch_contrast,
    pool_contrast,
    retrieval_contrast,
)
from hardneg.diagnostics import NegativeDiagnostics, negative_diagnostics
from hardneg.objectives import OBJECTIVES, POSITIVE_MODES, objective_loss
from hardneg.schedules import check_progress
from hardneg.strategies.base import StepContext, Strategy


@dataclass
class LossOutput:
    """What ``forward(..., return_diagnostics=True)`` returns."""

    loss: Tensor
    per_anchor: Tensor
    diagnostics: NegativeDiagnostics
    terms: dict[str, float] = field(default_factory=dict)


@dataclass
class ContrastInputs:
    """Everything one call hands to a strategy's :meth:`~hardneg.strategies.Strategy.terms`."""

    z1: Tensor
    z2: Tensor
    temperature: float
    negatives: Tensor | None = None
    hard_negatives: Tensor | None = None
    extra_views: tuple[Tensor, ...] = ()
    ids: Tensor | None = None
    anchor_ids: Tensor | None = None
    false_negatives: Tensor | None = None
    exclude_index: Tensor | None = None
    h1: Tensor | None = None
    h2: Tensor | None = None
    negative_h: Tensor | None = None
    labels: Tensor | None = None
    negative_labels: Tensor | None = None
    normalize: bool = True

    @property
    def form(self) -> str:
        if self.negatives is not None:
            return "pool"
        if self.hard_negatives is not None:
            return "retrieval"
        return "in_batch"

    def standard_contrast(self, fast: bool = False) -> ContrastSet:
        """The contrast set of the call form, with features and labels attached. ``fast``: two
        views without ids on cosines take :func:`hardneg.fastpaths.pair_contrast` (the same
        fields and values; its backward has no masking pass and no product for the positives'
        logits), and every form normalises with :func:`hardneg.fastpaths.unit_rows`."""
        t = self.temperature
        if self.negatives is not None and self.negatives.dim() == 3:  # a pool per anchor
            contrast = build_contrast(
                self.z1,
                self.negatives.new_zeros(0, self.negatives.shape[-1]),
                positives=self.z2,
                anchor_columns=self.negatives.detach(),
                temperature=t,
                normalize=self.normalize,
                fast=fast,
            )
            contrast.anchor_features = self.h1
            contrast.anchor_labels, contrast.column_labels = self.labels, self.negative_labels
            if self.negative_labels is None:
                contrast.anchor_labels = None
            return contrast
        if self.negatives is not None:
            contrast = pool_contrast(
                self.z1,
                self.z2,
                self.negatives,
                temperature=t,
                exclude_index=self.exclude_index,
                normalize=self.normalize,
                fast=fast,
            )
            contrast.anchor_features, contrast.column_features = self.h1, self.negative_h
            contrast.anchor_labels, contrast.column_labels = self.labels, self.negative_labels
            if self.negative_labels is None:
                contrast.anchor_labels = None
            return contrast
        if self.hard_negatives is not None:
            contrast = retrieval_contrast(
                self.z1,
                self.z2,
                self.hard_negatives,
                temperature=t,
                candidate_ids=self.ids,
                anchor_ids=self.anchor_ids,
                normalize=self.normalize,
                fast=fast,
            )
            contrast.anchor_features = self.h1
            return contrast
        views = (self.z1, self.z2, *self.extra_views)
        if fast and len(views) == 2 and self.ids is None and self.normalize:
            from hardneg import fastpaths

            contrast = fastpaths.pair_contrast(self.z1, self.z2, temperature=t)
        else:
            contrast = in_batch_contrast(
                views, temperature=t, ids=self.ids, normalize=self.normalize, fast=fast
            )
        if self.h1 is not None and self.h2 is not None and not self.extra_views:
            contrast.anchor_features = contrast.column_features = torch.cat([self.h1, self.h2])
        if self.labels is not None:
            contrast.anchor_labels = contrast.column_labels = self.labels.repeat(len(views))
        return contrast


def check_views(
    z1: Tensor, z2: Tensor, names: tuple[str, str] = ("z1", "z2"), *, min_rows: int = 2
) -> None:
    # rows checked below, with the reason (an empty batch included: no anchor, no negative)
    check_embeddings(names[0], z1, min_rows=0)
    check_embeddings(names[1], z2, min_rows=0)
    check_same_shape(names[0], z1, names[1], z2)
    if z1.shape[0] < min_rows:
        raise ValueError(
            f"{names[0]} and {names[1]} need a batch of at least N = {min_rows} samples "
            f"(a contrastive loss needs negatives), got N = {z1.shape[0]}"
        )


def check_optional_features(name: str, h: Tensor | None, rows: int) -> None:
    if h is None:
        return
    check_embeddings(name, h)
    if h.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows (one per sample), got {h.shape[0]}")


class ContrastiveLoss(nn.Module):
    """A strategy plugged into an objective (InfoNCE family or Jensen-Shannon).

    Args:
        strategy: decides the weights or the selection of negatives (and maybe positives).
        temperature: ``t > 0``.
        tau_plus: class prior of the debiased estimator, in [0, 1) (0 = none).
        objective: ``'infonce'`` (log-space InfoNCE, debiased with ``tau_plus``) or ``'jsd'``
            (Jensen-Shannon / Fenchel-dual, as InfoGraph).
        positive_mode: with several positives, ``'separate'`` (each its own partition, SupCon
            ``L_out``), ``'joint'`` (all positives in the partition) or ``'pooled'`` (one term
            per anchor, the positives' total mass against the partition: solo-learn's
            multi-crop SimCLR loss); see :mod:`hardneg.objectives`.
        normalize: L2-normalise the embeddings (cosine similarity); False uses raw dot
            products, as InfoGraph's Jensen-Shannon objective does.
        filter: a registered filter strategy (``is_filter``: ``'positive_aware'``, or
            ``'fnc'`` eliminating its false negatives) that drops negatives before ``strategy``
            weights or samples the rest.
        filter_options: the filter's hyper-parameters (a dict; over its ``filter_defaults``).
        check_inputs: validate shapes, dtypes and finiteness on every call (host syncs).
        fast: let strategies take their fast paths (:mod:`hardneg.fastpaths`; equal to the
            plain ones, tested); ignored under ``torch.compile``.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        temperature: float = 0.5,
        tau_plus: float = 0.0,
        objective: str = "infonce",
        positive_mode: str = "separate",
        normalize: bool = True,
        filter: str | None = None,
        filter_options: dict | None = None,
        check_inputs: bool = True,
        fast: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(strategy, Strategy):
            got = type(strategy).__name__
            if isinstance(strategy, type) and issubclass(strategy, Strategy):
                got = f"the class {strategy.__name__} (construct it: {strategy.__name__}(...))"
            raise ValueError(f"strategy must be a hardneg Strategy instance, got {got}")
        self.strategy = strategy
        self.temperature = check_number("temperature", temperature, low=0.0, low_inclusive=False)
        self.tau_plus = check_number("tau_plus", tau_plus, low=0.0, high=1.0, high_inclusive=False)
        if self.tau_plus > 0 and not strategy.supports_debiasing:
            raise ValueError(
                f"tau_plus must be 0 for the {type(strategy).__name__} strategy "
                f"(it selects negatives and has no debiased estimator), got {tau_plus!r}"
            )
        self.objective = check_choice("objective", objective, OBJECTIVES)
        self.positive_mode = check_choice("positive_mode", positive_mode, POSITIVE_MODES)
        if self.objective == "jsd" and self.positive_mode != "separate":
            raise ValueError(  # jsd_objective takes no positive_mode: a silent no-op
                "objective='jsd' averages the positives' terms and has no partition for them to "
                f"share: positive_mode must be 'separate' (the default), got {self.positive_mode!r}"
            )
        if strategy.fixed_positive_mode and self.positive_mode != "separate":
            raise ValueError(  # its objective_options would override it: a silent no-op
                f"{strategy.name or type(strategy).__name__} sets the positive mode of each of "
                f"its terms itself; positive_mode must be 'separate' (the default), got "
                f"{self.positive_mode!r}"
            )
        if not isinstance(check_inputs, bool):
            raise ValueError(f"check_inputs must be True or False, got {check_inputs!r}")
        if not isinstance(fast, bool):
            raise ValueError(f"fast must be True or False, got {fast!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        self.normalize = normalize
        self.filter = filter
        if filter_options is not None and not isinstance(filter_options, dict):
            raise ValueError(
                "filter_options must be a dict of the filter's options, got "
                f"{type(filter_options).__name__}"
            )
        self.filter_options = dict(filter_options or {})
        self.filter_strategy: Strategy | None = None
        if filter is not None:
            from hardneg.registry import list_losses, strategy_class

            filters = [name for name in list_losses() if strategy_class(name).is_filter]
            if filter not in filters:
                raise ValueError(
                    f"filter must name a filter strategy (one that only drops negatives), got "
                    f"{filter!r}{closest_hint(filter, filters)}; allowed: {', '.join(filters)}"
                )
            cls = strategy_class(filter)
            allowed = cls.hparam_names()
            for key in self.filter_options:  # Python's TypeError from __init__ names no filter
                if key not in allowed:
                    raise ValueError(
                        f"unknown filter option {key!r} for filter {filter!r}"
                        f"{closest_hint(key, allowed)}; allowed: {', '.join(allowed)}"
                    )
            if type(strategy).terms is not Strategy.terms:
                raise ValueError(
                    f"a filter cannot stand in front of {type(strategy).__name__}: it builds "
                    "several contrast terms of its own"
                )
            self.filter_strategy = cls(**{**cls.filter_defaults, **self.filter_options})
            self.filter_strategy.check_filter()
        elif filter_options:
            raise ValueError("filter_options needs a filter (filter='positive_aware', ...)")
        self.check_inputs = check_inputs
        self.fast = fast

    # what a framework asks the loss (and through it the strategy)
    @property
    def feature_kind(self) -> str | None:
        return self.strategy.feature_kind

    @property
    def draws(self) -> bool:
        return self.strategy.draws

    @property
    def per_anchor_columns(self) -> bool:
        return self.strategy.per_anchor_columns

    def hparams(self) -> dict[str, object]:
        """Loss-level settings and the strategy's hyper-parameters, for logs and checkpoints."""
        out: dict[str, object] = {
            "temperature": self.temperature,
            "tau_plus": self.tau_plus,
            "objective": self.objective,
            "positive_mode": self.positive_mode,
            "normalize": self.normalize,
            "filter": self.filter,
            "filter_options": dict(self.filter_options),
        }
        out.update(self.strategy.hparams())
        return out

    def extra_repr(self) -> str:
        text = (
            f"temperature={self.temperature}, tau_plus={self.tau_plus}, "
            f"objective={self.objective!r}"
        )
        # the other settings only when they differ from the default: each changes the value
        if not self.normalize:
            text += ", normalize=False"
        if self.positive_mode != "separate":
            text += f", positive_mode={self.positive_mode!r}"
        if self.filter is not None:  # its options show in the filter_strategy child
            text += f", filter={self.filter!r}"
        return text

    def _check_call_form(self, inputs: ContrastInputs) -> None:
        """Arguments that the call form would ignore, and tensors on different devices. Python
        checks only (no host sync), so they run even with ``check_inputs=False``: an ignored
        argument gives a plausible loss that is silently not the one asked for."""
        if inputs.negatives is not None and inputs.hard_negatives is not None:
            raise ValueError("give either negatives (a pool) or hard_negatives, not both")
        if inputs.extra_views and inputs.form != "in_batch":
            given = "negatives" if inputs.form == "pool" else "hard_negatives"
            raise ValueError(
                "extra_views belong to the in-batch form (loss(z1, z2, extra_views=[...])); "
                f"with {given} they would be ignored: add the views' rows to {given} instead"
            )
        if inputs.ids is not None and inputs.form == "pool":
            raise ValueError(
                "ids mask duplicates in the in-batch and retrieval forms; with a pool "
                "(negatives=...) they would be ignored: to mask each query's own pool row, "
                "use exclude_index=[N] (its row in negatives)"
            )
        if inputs.false_negatives is not None:
            self._check_false_negatives(inputs)
        if inputs.negative_h is not None and inputs.negatives is None:
            raise ValueError(
                "negative_h (features of the pool's rows) needs negatives=[K, d]; in-batch the "
                "columns' features are h1 and h2"
            )
        self._check_features(inputs)
        first = "q" if inputs.form == "pool" else "z1"
        named = [
            ("z2" if first == "z1" else "k", inputs.z2),
            ("negatives", inputs.negatives),
            ("hard_negatives", inputs.hard_negatives),
            *((f"extra_views[{i}]", v) for i, v in enumerate(inputs.extra_views)),
            # features enter the strategies' arithmetic as given (index tensors such as ids
            # and exclude_index are moved to the logits' device by the contrast builders)
            ("h1", inputs.h1),
            ("h2", inputs.h2),
            ("negative_h", inputs.negative_h),
        ]
        device = inputs.z1.device if isinstance(inputs.z1, Tensor) else None
        for name, x in named:
            if device is not None and isinstance(x, Tensor) and x.device != device:
                raise ValueError(
                    f"{first} and {name} must be on the same device, got {device} and {x.device}"
                )

    def _without_false_negatives(
        self, contrast: ContrastSet, false_negatives: Tensor
    ) -> ContrastSet:
        """``contrast`` with the known false negatives masked; a term laid out otherwise than
        the retrieval columns (a strategy's own term) cannot take the mask: refused."""
        if tuple(contrast.negative_logits.shape) != tuple(false_negatives.shape):
            name = getattr(self.strategy, "name", type(self.strategy).__name__)
            raise ValueError(
                f"{name} builds a term with {tuple(contrast.negative_logits.shape)} candidate "
                f"columns, not the retrieval layout that false_negatives "
                f"{tuple(false_negatives.shape)} describes; it cannot take false_negatives"
            )
        return contrast.restricted(~false_negatives)

    @staticmethod
    def _check_false_negatives(inputs: ContrastInputs) -> None:
        """Shape, dtype and device of ``false_negatives`` (no host sync)."""
        mask = inputs.false_negatives
        if inputs.form != "retrieval":
            raise ValueError(
                "false_negatives belongs to the retrieval form (loss(anchor, positive, "
                "hard_negatives=[N, h, d], false_negatives=[N, N (1 + h)])); in the in-batch and "
                "pool forms, ids and exclude_index mask known duplicates"
            )
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = f"dtype {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"false_negatives must be a bool tensor (True = masked), got {got}")
        hard, n = inputs.hard_negatives, inputs.z1.shape[0]
        width = n * (1 + hard.shape[1]) if isinstance(hard, Tensor) and hard.dim() == 3 else None
        if width is not None and tuple(mask.shape) != (n, width):
            raise ValueError(
                f"false_negatives must have shape (N, N (1 + h)) = ({n}, {width}): one row per "
                "anchor, one column per candidate (the positives, then the hard negatives "
                f"row-major), got {tuple(mask.shape)}"
            )
        if mask.device != inputs.z1.device:
            raise ValueError(
                f"z1 and false_negatives must be on the same device, got {inputs.z1.device} "
                f"and {mask.device}"
            )

    def _check_features(self, inputs: ContrastInputs) -> None:
        """The standard contrast sets attach features only as a complete set of their form
        (:meth:`ContrastInputs.standard_contrast`); a strategy that reads them would otherwise
        fall back to the embeddings without a word. A strategy with terms of its own (potential)
        reads h1 and h2 itself, and the pool form is left to the frameworks, which pass h1
        alone with a bank."""
        kind = self.strategy.feature_kind
        if kind is None or type(self.strategy).terms is not Strategy.terms:
            return
        if inputs.h1 is None and inputs.h2 is None:
            return
        name = getattr(self.strategy, "name", type(self.strategy).__name__)
        if inputs.form == "retrieval":
            raise ValueError(
                f"with hard_negatives, h1 and h2 would be ignored ({name} would read the "
                "embeddings instead): the hard negatives' features cannot be given; leave them out"
            )
        if inputs.form == "in_batch" and inputs.extra_views:
            raise ValueError(
                f"with extra_views, h1 and h2 would be ignored ({name} would read the "
                "embeddings instead); leave them out or pass two views"
            )
        if inputs.form == "in_batch" and (inputs.h1 is None or inputs.h2 is None):
            raise ValueError(
                f"{name} uses features in the in-batch form only as h1 and h2 together "
                f"(the {kind} features of both views); got only "
                f"{'h1' if inputs.h2 is None else 'h2'}"
            )

    def _validate(self, inputs: ContrastInputs) -> None:
        z1, z2, negatives = inputs.z1, inputs.z2, inputs.negatives
        if negatives is None:
            # one anchor with k >= 1 hard negatives still has negatives: the last, short batch
            # of a sentence-transformers epoch can hold a single (anchor, positive, negatives)
            hard = inputs.hard_negatives
            has_hard = isinstance(hard, Tensor) and hard.dim() == 3 and hard.shape[1] > 0
            check_views(z1, z2, min_rows=1 if has_hard else 2)
            for i, v in enumerate(inputs.extra_views):
                check_embeddings(f"extra_views[{i}]", v)
                check_same_shape("z1", z1, f"extra_views[{i}]", v)
        else:
            # the pool holds the negatives: one query (the last batch of a run) is a loss too
            check_views(z1, z2, ("q", "k"), min_rows=1)
            per_anchor = isinstance(negatives, Tensor) and negatives.dim() == 3
            if per_anchor and negatives.shape[0] != z1.shape[0]:
                raise ValueError(
                    f"a per-anchor pool must have shape (N, K, d) with N = {z1.shape[0]} "
                    f"queries, got {tuple(negatives.shape)}"
                )
            check_embeddings("negatives", negatives.flatten(0, 1) if per_anchor else negatives)
            if negatives.shape[-1] != z1.shape[1]:
                raise ValueError(
                    f"negatives must have the embedding dim of q ({z1.shape[1]}), "
                    f"got shape {tuple(negatives.shape)}"
                )
        if inputs.hard_negatives is not None:
            h = inputs.hard_negatives
            if (
                not isinstance(h, Tensor)
                or h.dim() != 3
                or h.shape[0] != z1.shape[0]
                or h.shape[2] != z1.shape[1]
            ):
                shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
                raise ValueError(
                    f"hard_negatives must have shape (N, k, d) = ({z1.shape[0]}, k, {z1.shape[1]}), got {shape}"
                )
            if h.shape[1] > 0:  # h = 0: pairs in the retrieval layout
                check_embeddings("hard_negatives", h.reshape(-1, h.shape[-1]))
        n = z1.shape[0]
        check_optional_features("h1", inputs.h1, n)
        check_optional_features("h2", inputs.h2, n)
        if inputs.h1 is not None and inputs.h2 is not None:  # rows of one feature matrix
            check_same_shape("h1", inputs.h1, "h2", inputs.h2)
        per_anchor = negatives is not None and negatives.dim() == 3
        if per_anchor and inputs.negative_h is not None:
            raise ValueError(
                "negative_h needs a shared pool (negatives [K, d]), not a per-anchor one"
            )
        if negatives is not None and not per_anchor:
            check_optional_features("negative_h", inputs.negative_h, negatives.shape[0])
        if inputs.exclude_index is not None:
            if negatives is None or per_anchor:
                raise ValueError("exclude_index needs a shared external pool (negatives=[K, d])")
            check_index("exclude_index", inputs.exclude_index, n, negatives.shape[0])
            if negatives.shape[0] < 2:
                raise ValueError("a pool with exclude_index needs at least 2 entries")
        if inputs.ids is not None:
            if inputs.hard_negatives is not None:  # one id per candidate column
                check_labels("ids", inputs.ids, n * (1 + inputs.hard_negatives.shape[1]))
            else:
                check_labels("ids", inputs.ids, n)
        if inputs.anchor_ids is not None:
            if inputs.hard_negatives is None or inputs.ids is None:
                raise ValueError(
                    "anchor_ids (the anchors' own ids) belongs to the retrieval form: pass "
                    "hard_negatives and ids (one per candidate) with it"
                )
            check_labels("anchor_ids", inputs.anchor_ids, n)
        # labels reach this point only with return_diagnostics (forward drops them otherwise)
        if inputs.negative_labels is not None and negatives is None:
            raise ValueError(
                "negative_labels (the classes of the pool's rows) need negatives=...; "
                "without a pool the columns are the batch's own samples: labels=[N] covers them"
            )
        if inputs.labels is not None and inputs.hard_negatives is not None:
            raise ValueError(
                "labels cannot be used with hard_negatives: the classes of the hard negatives "
                "are unknown, so class-based diagnostics (false-negative mass, top-k precision) "
                "are undefined; leave labels out (the other diagnostics need none)"
            )
        if inputs.labels is not None and negatives is not None and inputs.negative_labels is None:
            raise ValueError(
                "labels with a pool need negative_labels (the classes of the pool's rows, [K] "
                "or [N, K] for a per-query pool): the class-based diagnostics compare a query's "
                "class with its negatives'"
            )
        if inputs.labels is not None:
            check_labels("labels", inputs.labels, n)
        if inputs.negative_labels is not None and per_anchor:
            check_labels(
                "negative_labels", inputs.negative_labels.flatten(), negatives.shape[:2].numel()
            )
            if inputs.negative_labels.shape != negatives.shape[:2]:
                raise ValueError(
                    f"negative_labels of a per-anchor pool must have shape "
                    f"{tuple(negatives.shape[:2])}, got {tuple(inputs.negative_labels.shape)}"
                )
        elif inputs.negative_labels is not None and negatives is not None:
            check_labels("negative_labels", inputs.negative_labels, negatives.shape[0])

    def forward(
        self,
        z1: Tensor,
        z2: Tensor,
        negatives: Tensor | None = None,
        *,
        hard_negatives: Tensor | None = None,
        extra_views: list[Tensor] | tuple[Tensor, ...] | None = (),
        ids: Tensor | None = None,
        anchor_ids: Tensor | None = None,
        false_negatives: Tensor | None = None,
        progress: float | None = None,
        h1: Tensor | None = None,
        h2: Tensor | None = None,
        negative_h: Tensor | None = None,
        exclude_index: Tensor | None = None,
        generator: torch.Generator | None = None,
        labels: Tensor | None = None,
        negative_labels: Tensor | None = None,
        return_diagnostics: bool = False,
        reduction: str = "mean",
    ) -> Tensor | LossOutput:
        """Loss for one step.

        Args:
            z1, z2: ``[N, d]`` views (queries and positive keys with a pool; anchors and
                positives with ``hard_negatives``).
            negatives: ``[K, d]`` external pool, ``[N, K, d]`` a pool per query, or None.
                Detached, as a queue or a bank: no gradient reaches it (negatives that
                should get gradients go in ``hard_negatives``). A 3-D third positional
                argument is this per-query pool, not the retrieval form.
            hard_negatives: ``[N, h, d]`` explicit hard negatives per anchor (retrieval).
            extra_views: further ``[N, d]`` views (in-batch only: refused beside ``negatives``
                or ``hard_negatives``, which would ignore them).
            ids: ``[N]`` sample ids; equal ids are duplicates (masked). With ``hard_negatives``:
                ``[N (1 + h)]``, one per candidate (positives, then hard negatives row-major);
                a candidate with the id of the anchor's positive is masked. Refused with a pool
                (its rows have no ids): ``exclude_index`` masks a query's own row.
            anchor_ids: ``[N]`` with ``hard_negatives`` and ``ids``: the anchors' own ids; a
                candidate with the anchor's id is masked too (a text is not its own negative).
            false_negatives: ``[N, N (1 + h)]`` bool with ``hard_negatives``: True where a
                candidate (columns as ``ids``) is known not to be a negative of the anchor (a
                second relevant document, a guide model's false negative); masked, neither
                positive nor negative. The anchor's own positive stays its positive.
            progress: fraction of training done, in [0, 1], for annealed strategies.
            h1, h2: ``[N, h]`` features of the two views (see ``strategy.feature_kind``).
            negative_h: ``[K, h]`` the same features of the pool entries.
            exclude_index: ``[N]`` pool row of each query's own entry (memory bank), masked.
            generator: random generator for strategies that draw.
            labels, negative_labels: class ids for diagnostics only (``negative_labels``
                ``[K]``, or ``[N, K]`` with a per-anchor pool); never used by the loss.
            return_diagnostics: return a :class:`LossOutput` instead of the scalar.
            reduction: ``'mean'`` (the scalar loss) or ``'none'`` (the per-anchor losses
                ``[A]``, for a strategy with one contrast term; what a caller that combines
                anchors' partitions itself needs, e.g. the joint partition of
                :func:`hardneg.objectives.joint_partition_loss`).
        """
        if progress is not None:
            progress = check_progress(progress)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if not isinstance(return_diagnostics, bool):
            raise ValueError(
                f"return_diagnostics must be True or False, got {return_diagnostics!r}"
            )
        check_choice("reduction", reduction, ("mean", "none"))
        if reduction == "none" and return_diagnostics:
            raise ValueError(
                "reduction='none' returns the per-anchor losses; return_diagnostics=True "
                "returns them too (LossOutput.per_anchor): ask for one of the two"
            )
        inputs = ContrastInputs(
            z1=z1,
            z2=z2,
            temperature=self.temperature,
            negatives=negatives,
            hard_negatives=hard_negatives,
            extra_views=() if extra_views is None else tuple(extra_views),
            ids=ids,
            anchor_ids=anchor_ids,
            false_negatives=false_negatives,
            exclude_index=exclude_index,
            h1=h1,
            h2=h2,
            negative_h=negative_h,
            labels=labels if return_diagnostics else None,
            negative_labels=negative_labels if return_diagnostics else None,
            normalize=self.normalize,
        )
        self._check_call_form(inputs)
        if self.check_inputs:
            self._validate(inputs)
        fast = self.fast and not return_diagnostics and not torch.compiler.is_compiling()
        context = StepContext(
            progress=progress,
            generator=generator,
            fast=fast,
            want_log_mass=self.objective == "infonce" and not return_diagnostics,
        )
        loss: Tensor | None = None
        main_per_anchor: Tensor | None = None
        main = None
        term_values: dict[str, float] = {}
        terms = list(self.strategy.terms(inputs, context))
        if reduction == "none" and len(terms) > 1:
            raise ValueError(
                "reduction='none' needs a strategy with one contrast term per anchor; "
                f"{type(self.strategy).__name__} sums {len(terms)} terms of its own"
            )
        for weight, contrast, role in terms:
            if inputs.false_negatives is not None:  # known false negatives: neither
                contrast = self._without_false_negatives(contrast, inputs.false_negatives)
            if self.filter_strategy is not None:
                contrast = contrast.restricted(self.filter_strategy.keep(contrast, context))
            selection = self.strategy.select_term(contrast, context, role)
            options = {"positive_mode": self.positive_mode, **self.strategy.objective_options(role)}
            per_anchor = objective_loss(
                self.objective, contrast, selection, tau_plus=self.tau_plus, fast=fast, **options
            )
            value = per_anchor.mean()
            loss = weight * value if loss is None else loss + weight * value
            if main is None:
                main, main_per_anchor = (contrast, selection), per_anchor
            if return_diagnostics:
                term_values[role] = term_values.get(role, 0.0) + float(weight * value.detach())
        assert loss is not None and main is not None and main_per_anchor is not None
        if reduction == "none":
            return terms[0][0] * main_per_anchor
        if not return_diagnostics:
            return loss
        diag = negative_diagnostics(*main)
        return LossOutput(
            loss=loss, per_anchor=main_per_anchor, diagnostics=diag, terms=term_values
        )
