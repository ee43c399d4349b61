"""Offline hard-negative mining for retrieval data: ``(query, positive)`` pairs and a corpus in,
``(anchor, positive, negative_1..k)`` rows out.

Pipeline (:func:`mine_hard_negatives`):

1. **Embed** the corpus, queries and positives in batches of ``batch_size`` (L2-normalised),
   optionally cached on disk (``cache_dir``: one ``.npy`` per text list and model, memory-mapped
   when read back).
2. **Top-k in chunks**: ``query_chunk_size x corpus_chunk_size`` score blocks, each merged into a
   running top-``K`` per query; the full ``queries x corpus`` matrix never exists, so peak
   memory is bounded by the chunk sizes and ``K``. Corpus entries whose text equals the query
   or a positive of the query (of any pair with the same anchor text) are skipped; with
   ``include_positives`` (sentence-transformers' option, for reranking sets) the positives are
   ranked in place instead, and only the query's own text is skipped, unless it is its positive.
3. **Window and filters** on the ranked candidates (ranks count from 0 = most similar, the
   positive excluded): ranks ``[range_min, range_max)``; ``min_score``/``max_score``; the
   positive-aware margins of NV-Retriever (Moreira et al. 2024): ``absolute_margin`` keeps
   ``s <= s_pos - m`` (TopK-MarginPos), ``relative_margin`` keeps ``s <= s_pos - |s_pos| m``
   (TopK-PercPos, ``s_pos (1 - m)`` for ``s_pos >= 0``; 0.05 = "95%").
   With a ``cross_encoder`` (a reranker, as sentence-transformers' ``mine_hard_negatives``
   takes one), the embedding model's ``range_max`` best candidates of each query and its
   positive are scored again by it (``predict`` on ``(query, text)`` pairs), the candidates are
   ranked by those scores (the window skips the cross-encoder's ``range_min`` best), and the
   filters, the margins, the sampling and ``output_scores`` read them instead of
   the cosines: the embedding model proposes, the cross-encoder, which sees query and text
   together, judges (NV-Retriever's advice against false negatives). Its scores are on its own
   scale (a sigmoid's 0..1 for a one-label reranker), which the score bounds and the samplers'
   settings must follow.
4. **Sampling** ``num_negatives`` among the survivors, without replacement, by the strategy
   classes that weight negatives in the loss (:func:`pick_negatives`, on the candidates as a
   :class:`~hardneg.contrast.ContrastSet`):

   * ``top``: the most similar survivors;
   * ``random``: uniform (Gumbel top-k: ``argtop_k(log p + Gumbel)`` draws without replacement
     with probabilities ``∝ p``);
   * ``simans``: SimANS (Zhou et al., EMNLP 2022), ``p ∝ exp(-a (s - s_pos - b)^2)``, drawn by
     ``SimANSNegatives(num_samples=num_negatives)`` itself;
   * ``hcl``: HCL's importance weights (Robinson et al., ICLR 2021) from
     ``ImportanceNegatives.select``, ``p ∝ exp(beta s / t)``;
   * ``ring``: Ring's band (Wu et al., ICLR 2021) from ``RingNegatives.select``: the survivors
     ranked by similarity, ranks ``[int(rho_in U), U)`` with ``U = int(rho_out M)``, uniform
     inside the band;
   * ``potential``: potential-sample mining's kernel (Dong et al. 2023) from
     ``PotentialMining.log_keep``: each survivor is kept with probability
     ``min(clamp, exp(-a (s - s_pos - b)^2))`` (one Bernoulli draw each, as the loss draws its
     cells) and the most similar kept ones are taken.

**Several processes** (``torchrun``, or any initialised ``torch.distributed`` group): the corpus is
split into contiguous shards, one per rank; each rank embeds and ranks only its shard
(``chunked_top_k`` over its rows), the queries and the positives outside the corpus are embedded
in shards too and all-gathered, and the per-query top-``K`` lists of the ranks are all-gathered
and merged (the ``K`` best of the ``R K`` candidates). Every rank then holds the top-``K`` that
one process computes and selects the same negatives (the sampling generator is seeded alike);
only the corpus embeddings of one shard and ``Q x R K`` merged scores are held per rank.
:func:`hardneg.commands.mine` joins the group from torchrun's environment and writes the output on
rank 0 only.

Queries with fewer than ``num_negatives`` survivors yield fewer triplets, and no n-tuple row.
Rows come back as a list of dicts in sentence-transformers' formats (``triplet``: ``anchor,
positive, negative``; ``n-tuple``: ``anchor, positive, negative_1..k``; for cross-encoders
``labeled-pair``: ``anchor, positive, label`` and ``labeled-list``: ``anchor, [documents],
[labels]``, grouped by anchor), with ``output_scores`` the model's cosines (``scores`` =
``[s_pos, s_neg...]``, what ``MarginMSELoss`` distils from; ``score`` / ``scores`` in place of
the labels), or as a ``datasets.Dataset`` (``as_dataset=True``); :func:`save_rows` writes jsonl
or parquet.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hardneg._checks import check_choice, check_flag, check_number
from hardneg.contrast import ContrastSet

SAMPLING = ("top", "random", "simans", "hcl", "ring", "potential")
FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")


@dataclass(frozen=True)
class SamplerOptions:
    """The hyper-parameters of the weighted samplers of :func:`pick_negatives`: the one place
    where their defaults live and where the ones no strategy class checks are checked
    (:func:`mine_hard_negatives` and ``hardneg mine`` take them as flat keywords)."""

    simans_a: float = 1.0
    simans_b: float = 0.0
    hcl_beta: float = 1.0
    temperature: float = 0.05
    ring_rho_out: float = 0.5
    ring_rho_in: float = 0.1
    potential_a: float = 0.5
    potential_b: float = 0.0
    potential_clamp: float = 0.999

    def __post_init__(self) -> None:
        # the strategy classes check their own settings when built; these three are read
        # before (temperature) or outside (the potential kernel) a class's checks
        check_number("temperature", self.temperature, low=0.0, low_inclusive=False)
        check_number("potential_a", self.potential_a, low=0.0)
        check_number(
            "potential_clamp", self.potential_clamp, low=0.0, low_inclusive=False, high=1.0
        )

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> SamplerOptions:
        """Options from keywords, with a clear error for a name that is not an option."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise ValueError(f"unknown sampler option(s) {unknown}; the options are {names}")
        return cls(**settings)


_DEFAULTS = SamplerOptions()

# sentence-transformers' mine_hard_negatives arguments: their name here, or why they are not
# offered (they fell through to Python's bare "unexpected keyword argument")
_ST_MINING_ARGUMENTS: dict[str, str] = {
    "anchor_column_name": "anchor_column=<anchor_column_name>",
    "positive_column_name": "positive_column=<positive_column_name>",
    "sampling_strategy": "sampling=<sampling_strategy> ('top', 'random', or a strategy's "
    "sampler: 'simans', 'hcl', 'ring', 'potential')",
    "cache_folder": "cache_dir=<cache_folder>",
    "margin": "absolute_margin=<margin> (its deprecated name there)",
    "as_triplets": "output_format='triplet' (as_triplets=True) or 'n-tuple' (False)",
    "faiss_batch_size": "query_chunk_size=<faiss_batch_size> (queries per score block)",
    "use_faiss": "not offered: the top-k runs exactly, in score blocks of query_chunk_size x "
    "corpus_chunk_size",
    "use_multi_process": "not offered: run under torchrun, which shards the corpus over the "
    "processes",
}


@dataclass
class MiningStats:
    """What happened during one mining run."""

    queries: int = 0
    corpus: int = 0
    rows: int = 0
    short_queries: int = 0  # queries with fewer than num_negatives survivors
    seconds: dict[str, float] = field(default_factory=dict)
    mean_positive_score: float = float("nan")
    mean_negative_score: float = float("nan")


def _texts(name: str, values: object) -> list[str]:
    if values is None:
        raise ValueError(f"{name} is required")
    if isinstance(values, str):  # list("abc") mined for the queries "a", "b" and "c"
        raise ValueError(f"{name} must be a list of texts, got one string ({values[:40]!r})")
    out = list(values)  # type: ignore[arg-type]
    bad = [i for i, v in enumerate(out) if not isinstance(v, str)]
    if bad:
        raise ValueError(
            f"{name} must hold strings; entry {bad[0]} is {type(out[bad[0]]).__name__}"
        )
    return out


def _from_dataset(data: Any, anchor_column: str, positive_column: str) -> tuple[list, list]:
    columns = list(getattr(data, "column_names", []) or [])
    missing = [c for c in (anchor_column, positive_column) if c not in columns]
    if missing:
        raise ValueError(
            f"expected the layout ({anchor_column}, {positive_column}) (columns "
            f"{anchor_column!r} and {positive_column!r}); the dataset has columns {columns} "
            f"(missing {missing}; set anchor_column / positive_column)"
        )
    return list(data[anchor_column]), list(data[positive_column])


ENCODE_BATCHES_PER_CALL = 16


def model_fingerprint(model: Any) -> str:
    """The name of ``model``'s weights in the embedding cache: for a torch module, its class and,
    per tensor of its ``state_dict``, the name, shape, dtype and the float64 sum and sum of
    squares (a training step changes them; one host transfer for the whole model); for anything
    else, its class name."""
    if not isinstance(model, torch.nn.Module):
        return type(model).__name__
    key = hashlib.sha1(type(model).__name__.encode())
    sums = []
    for name, tensor in model.state_dict().items():
        key.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        values = tensor.detach().double()
        sums.append(torch.stack([values.sum(), values.square().sum()]))
    if sums:  # gathered where the first tensor lives, then one copy to the host
        key.update(torch.cat([x.to(sums[0].device) for x in sums]).cpu().numpy().tobytes())
    return f"{type(model).__name__}-{key.hexdigest()[:20]}"


def embed_texts(
    model: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    model_key: str | None = None,
    prompt: str | None = None,
    prompt_name: str | None = None,
) -> Tensor:
    """``[n, d]`` L2-normalised float32 embeddings, in batches; cached as ``.npy`` if asked.

    ``prompt`` (a string put before every text, e.g. E5's ``"query: "``) or ``prompt_name`` (a
    key of the model's ``prompts``) go to ``model.encode`` when it takes them (a
    ``SentenceTransformer``, which can leave the prompt's tokens out of the pooling); a model
    whose ``encode`` takes no prompt gets ``prompt`` written before each text."""
    encode_kwargs = _prompt_kwargs(model, prompt, prompt_name)
    if prompt is not None and not encode_kwargs:
        texts = [prompt + t for t in texts]
    path = None
    if cache_dir is not None:
        key = hashlib.sha1()
        key.update((model_key or type(model).__name__).encode())
        # the prompt is part of what is embedded: another prompt is another cache entry
        key.update(f"prompt={prompt!r}|prompt_name={prompt_name!r}".encode())
        for t in texts:
            key.update(t.encode())
            key.update(b"\x00")
        path = Path(cache_dir) / f"emb_{key.hexdigest()[:20]}.npy"
        if path.exists():
            return torch.from_numpy(np.load(path, mmap_mode="r").copy())
    # longest texts first, as sentence-transformers' own encode does within one call: batches of
    # similar lengths carry little padding (measured 1.7-1.8x faster than batches in input order
    # on Lee sentences with MiniLM); blocks of several batches bound the memory of one call
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    block = batch_size * ENCODE_BATCHES_PER_CALL
    parts = []
    for start in range(0, len(order), block):
        with torch.no_grad():
            emb = model.encode(
                [texts[i] for i in order[start : start + block]],
                batch_size=batch_size,
                convert_to_tensor=True,
                show_progress_bar=False,
                **encode_kwargs,
            )
        if not isinstance(emb, Tensor) or emb.dim() != 2:
            raise ValueError(
                "model.encode must return a [batch, dim] embedding tensor, got "
                f"{type(emb).__name__} {tuple(getattr(emb, 'shape', ()))}"
            )
        given = min(block, len(order) - start)
        if emb.shape[0] != given or emb.shape[1] < 1 or emb.is_complex():
            # a missing row failed in an index_put; complex or empty rows ranked silently
            raise ValueError(
                f"model.encode returned a {tuple(emb.shape)} {emb.dtype} tensor for {given} "
                "texts: one real embedding row of dim >= 1 per text is needed"
            )
        emb = emb.float().cpu()
        # one read per block: a NaN row ranked as a candidate of every query, without a word
        if not bool(torch.isfinite(emb).all()):
            row = int((~torch.isfinite(emb)).any(dim=1).nonzero()[0, 0])
            text = texts[order[start + row]]
            raise ValueError(
                f"model.encode returned NaN or Inf in the embedding of {text[:60]!r}; "
                "only finite embeddings can be ranked"
            )
        parts.append(torch.nn.functional.normalize(emb, dim=-1))
    if not parts:
        return torch.zeros(0, 1)
    out = torch.empty(len(texts), parts[0].shape[1])
    out[torch.tensor(order)] = torch.cat(parts)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, out.numpy())
    return out


def _prompt_kwargs(model: Any, prompt: str | None, prompt_name: str | None) -> dict[str, str]:
    """The prompt keywords for ``model.encode``: those it takes (none when it takes no prompt;
    a ``prompt_name`` it cannot take, or that its ``prompts`` do not hold, fails naming it)."""
    if prompt is None and prompt_name is None:
        return {}
    if prompt is not None and prompt_name is not None:
        raise ValueError("give a prompt or a prompt name, not both")
    try:
        parameters = inspect.signature(model.encode).parameters.values()
    except (TypeError, ValueError):
        parameters = []
    takes = {p.name for p in parameters}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        takes |= {"prompt", "prompt_name"}  # encode(..., **kwargs)
    if prompt_name is not None:
        prompts = getattr(model, "prompts", None)
        if "prompt_name" not in takes or not isinstance(prompts, Mapping):
            raise ValueError(
                f"prompt name {prompt_name!r}: the model has no prompts (a SentenceTransformer "
                "saved with prompts={...} has); give the prompt text itself instead"
            )
        if prompt_name not in prompts:
            raise ValueError(
                f"prompt name {prompt_name!r} is not one of the model's prompts "
                f"({', '.join(map(repr, prompts)) or 'none'})"
            )
        return {"prompt_name": prompt_name}
    return {"prompt": str(prompt)} if "prompt" in takes else {}


def chunked_top_k(
    queries: Tensor,
    corpus: Tensor,
    k: int,
    *,
    exclude: list[set[int]] | None = None,
    query_chunk_size: int = 1024,
    corpus_chunk_size: int = 16384,
) -> tuple[Tensor, Tensor]:
    """``(scores [Q, k], indices [Q, k])`` of the ``k`` most similar corpus rows per query (dot
    products), descending, never holding more than ``query_chunk x (k + corpus_chunk)`` scores.
    ``exclude[i]``: corpus rows never returned for query ``i`` (its positives)."""
    check_number("k", k, low=0, integer=True)
    check_number("corpus_chunk_size", corpus_chunk_size, low=1, integer=True)
    if k > corpus.shape[0]:
        raise ValueError(f"k = {k} is larger than the corpus ({corpus.shape[0]} entries)")
    chunks = (
        corpus[cs : cs + corpus_chunk_size] for cs in range(0, corpus.shape[0], corpus_chunk_size)
    )
    return merge_top_k(queries, chunks, k, exclude=exclude, query_chunk_size=query_chunk_size)


def merge_top_k(
    queries: Tensor,
    chunks: Iterable[Tensor | np.ndarray],
    k: int,
    *,
    exclude: Sequence[set[int]] | None = None,
    query_chunk_size: int = 1024,
    stable: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(scores [Q, k], rows [Q, k])``: the ``k`` largest dot products of each query with the
    rows of ``chunks``, consecutive pieces of one corpus (rows numbered across them), descending.
    Each chunk is merged into a running top-``k`` and dropped, so at most ``query_chunk_size x
    (k + chunk rows)`` scores are held and the corpus is never needed whole (a memory-mapped
    cache, or documents embedded chunk by chunk). ``exclude[i]``: rows never returned for query
    ``i``. Past the end of a corpus smaller than ``k``: score ``-inf``, row ``-1``. ``stable``:
    equal scores keep the lower row first (:func:`stable_top_k` of each merge); else ``topk``,
    with ties in no promised order."""
    # shapes and sizes only (no host sync): each failed inside torch ("mat1 and mat2 shapes
    # cannot be multiplied", a negative dimension, "range() arg 3 must not be zero")
    k = int(check_number("k", k, low=0, integer=True))
    check_number("query_chunk_size", query_chunk_size, low=1, integer=True)
    if not isinstance(queries, Tensor) or queries.dim() != 2:
        got = tuple(queries.shape) if isinstance(queries, Tensor) else type(queries).__name__
        raise ValueError(f"queries must be a 2-D tensor [queries, dim], got {got}")
    if exclude is not None and len(exclude) != queries.shape[0]:
        raise ValueError(
            f"exclude must hold one set of rows per query ({queries.shape[0]}), got {len(exclude)}"
        )
    best = torch.full((queries.shape[0], k), float("-inf"), dtype=queries.dtype)
    best_rows = torch.full((queries.shape[0], k), -1, dtype=torch.long)
    offset = 0
    for chunk in chunks:
        c = torch.as_tensor(chunk)
        if c.dim() != 2 or c.shape[1] != queries.shape[1]:
            raise ValueError(
                f"the corpus rows from row {offset} on have shape {tuple(c.shape)}: rows of the "
                f"queries' dim {queries.shape[1]} are needed"
            )
        c = c.to(queries.dtype)  # a float64 or float16 corpus beside float32 queries
        rows = torch.arange(offset, offset + c.shape[0])
        for q0 in range(0, queries.shape[0], query_chunk_size):
            q1 = min(q0 + query_chunk_size, queries.shape[0])
            scores = queries[q0:q1] @ c.T
            if exclude is not None:
                for row in range(q0, q1):
                    cols = [j - offset for j in exclude[row] if offset <= j < offset + c.shape[0]]
                    if cols:
                        scores[row - q0, cols] = float("-inf")
            # the running best first: with stable=True equal scores keep the row seen earlier
            merged = torch.cat([best[q0:q1], scores], dim=1)
            merged_rows = torch.cat([best_rows[q0:q1], rows.expand(q1 - q0, -1)], dim=1)
            pos = stable_top_k(merged, k) if stable else merged.topk(k, dim=1).indices
            best[q0:q1] = merged.gather(1, pos)
            best_rows[q0:q1] = merged_rows.gather(1, pos)
        offset += c.shape[0]
    return best, best_rows


def stable_top_k(scores: Tensor, k: int) -> Tensor:
    """``[Q, k]`` column indices of the ``k`` largest scores of each row, descending, equal
    scores lower column first: ``torch.sort(scores, dim=1, descending=True,
    stable=True).indices[:, :k]`` without sorting whole rows (that sort of each ``k + chunk``
    merge took 6x the score products' time when ranking 200,000 documents in chunks of 50,000).
    ``topk`` finds the ``k + 1`` best; the first ``k`` are put in the tie order (by column,
    then stably by score). Only a row whose ``(k + 1)``-th score equals its ``k``-th (equal
    entries left out: which of them are in is the tie order's choice), or that holds a NaN
    (``topk`` ranks NaNs first, in no promised order), is sorted whole: with real-valued
    scores, seldom."""
    values, cols = scores.topk(min(k + 1, scores.shape[1]), dim=1)
    spill = torch.isnan(values).any(dim=1)
    if values.shape[1] > k:
        spill |= values[:, k] == values[:, k - 1]
    cols = cols[:, :k].sort(dim=1).values
    order = scores.gather(1, cols).sort(dim=1, descending=True, stable=True).indices
    cols = cols.gather(1, order)
    if bool(spill.any()):
        rows = spill.nonzero()[:, 0]
        cols[rows] = torch.sort(scores[rows], dim=1, descending=True, stable=True).indices[:, :k]
    return cols


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank`` when ``n`` rows are split into ``world`` contiguous
    shards whose sizes differ by at most one."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _world() -> tuple[int, int]:
    from hardneg import distributed

    return distributed.get_rank(), distributed.get_world_size()


def _gather_rows(x: Tensor) -> Tensor:
    """Every rank's rows of ``x`` concatenated in rank order (sizes may differ)."""
    from hardneg import distributed

    device = _collective_device()
    return distributed.gather_no_grad(x.to(device)).cpu()


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _embed_sharded(model: Any, texts: Sequence[str], **kwargs: Any) -> Tensor:
    """:func:`embed_texts` with the texts split over the ranks and the result all-gathered
    (every rank embeds all of them when there are fewer texts than ranks)."""
    rank, world = _world()
    if world == 1 or len(texts) < world:
        return embed_texts(model, texts, **kwargs)
    lo, hi = shard_bounds(len(texts), rank, world)
    return _gather_rows(embed_texts(model, texts[lo:hi], **kwargs))


def sharded_top_k(
    queries: Tensor,
    corpus_shard: Tensor,
    offset: int,
    k: int,
    *,
    exclude: list[set[int]] | None = None,
    query_chunk_size: int = 1024,
    corpus_chunk_size: int = 16384,
) -> tuple[Tensor, Tensor]:
    """The global top-``k`` ``(scores, indices)`` per query when each rank holds the corpus rows
    ``[offset, offset + len(corpus_shard))``: a local :func:`chunked_top_k` (global indices,
    ``-inf`` / ``-1`` padding when the shard has fewer than ``k`` rows), the ranks' lists
    all-gathered and merged."""
    _, world = _world()
    q = queries.shape[0]
    local_k = min(k, corpus_shard.shape[0])
    scores = torch.full((q, k), float("-inf"))
    index = torch.full((q, k), -1, dtype=torch.long)
    if local_k > 0:
        hi = offset + corpus_shard.shape[0]
        local_exclude = None
        if exclude is not None:
            local_exclude = [{j - offset for j in e if offset <= j < hi} for e in exclude]
        s, i = chunked_top_k(
            queries,
            corpus_shard,
            local_k,
            exclude=local_exclude,
            query_chunk_size=query_chunk_size,
            corpus_chunk_size=corpus_chunk_size,
        )
        scores[:, :local_k], index[:, :local_k] = s, i + offset
    if world == 1:
        return scores, index
    all_scores = _gather_rows(scores).reshape(world, q, k).permute(1, 0, 2).reshape(q, world * k)
    all_index = _gather_rows(index).reshape(world, q, k).permute(1, 0, 2).reshape(q, world * k)
    best, pos = all_scores.topk(k, dim=1)
    return best, all_index.gather(1, pos)


def gumbel_top_k(log_p: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``[Q, k]`` column indices drawn without replacement with probabilities ``∝ exp(log_p)``
    per row (Gumbel top-k); ``-inf`` entries are drawn only after every finite one."""
    u = torch.rand(log_p.shape, generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0)
    keys = log_p.double() - torch.log(-torch.log(u))
    return keys.topk(k, dim=1).indices


def candidate_contrast(
    queries: Tensor, scores: Tensor, positive: Tensor, keep: Tensor, temperature: float
) -> ContrastSet:
    """The mined candidates as a :class:`~hardneg.contrast.ContrastSet`: anchors the queries,
    negative logits ``s / t`` of the surviving candidates (``-inf`` elsewhere), the positive's
    logit ``s_pos / t`` and per-query counts of survivors, so that a strategy's ``select`` weighs
    them exactly as it weighs a batch's negatives in the loss."""
    q, width = scores.shape
    logits = (scores.double() / temperature).masked_fill(~keep, float("-inf"))
    anchors = queries.double()
    return ContrastSet(
        anchors=anchors,
        columns=anchors.new_zeros(width, anchors.shape[1]),  # not read by the selections here
        anchor_columns=None,
        positives=anchors.new_zeros(q, 1, anchors.shape[1]),
        positive_logits=positive.double() / temperature,
        positive_weight=anchors.new_ones(q, 1),
        positive_index=None,
        negative_logits=logits,
        negative_mask=keep,
        num_negatives=keep.sum(dim=1),
        temperature=float(temperature),
    )


def sampler_strategy(sampling: str, options: SamplerOptions, num_negatives: int) -> Any:
    """The strategy class instance that ``sampling`` picks through (None for ``top`` and
    ``random``), built from ``options``: building it checks its settings, so
    :func:`mine_hard_negatives` calls it before embedding anything."""
    from hardneg.strategies.importance import ImportanceNegatives
    from hardneg.strategies.potential import PotentialMining
    from hardneg.strategies.ring import RingNegatives
    from hardneg.strategies.simans import SimANSNegatives

    o = options
    if sampling == "hcl":
        return ImportanceNegatives(beta=o.hcl_beta)
    if sampling == "simans":
        return SimANSNegatives(a=o.simans_a, b=o.simans_b, num_samples=num_negatives)
    if sampling == "ring":
        return RingNegatives(rho_out=o.ring_rho_out, rho_in=o.ring_rho_in)
    if sampling == "potential":
        return PotentialMining(a=o.potential_a, b=o.potential_b, clamp=o.potential_clamp)
    return None


def pick_negatives(
    sampling: str,
    queries: Tensor,
    scores: Tensor,
    positive: Tensor,
    keep: Tensor,
    num_negatives: int,
    generator: torch.Generator,
    options: SamplerOptions | None = None,
    **settings: float,
) -> tuple[Tensor, Tensor]:
    """``(chosen [Q, num_negatives] column indices, keep [Q, W])``: the candidates picked per
    query among the survivors ``keep`` of the ranked ``scores [Q, W]`` (descending), and the
    survivors that the pick may use (``chosen`` columns outside it are not negatives).

    The weighting strategies pick through their own classes (the code that weights negatives
    in the loss), on :func:`candidate_contrast`:

    * ``hcl``: ``ImportanceNegatives(beta).select`` gives ``log w = beta s / t`` (normalised),
      drawn without replacement by :func:`gumbel_top_k`;
    * ``simans``: ``SimANSNegatives(a, b, num_samples=num_negatives).select`` draws in the
      strategy (its Gumbel top-k over ``-a (s - s_pos - b)^2``; cosines, i.e. ``t = 1``);
    * ``ring``: ``RingNegatives(rho_out, rho_in).select`` gives the band of ranks among each
      query's survivors (its per-anchor form), uniform without replacement inside;
    * ``potential``: ``PotentialMining(a, b, clamp).log_keep`` is the keep probability of each
      candidate, one Bernoulli draw each (as the loss draws its cells); the most similar kept
      candidates are taken.

    The samplers' settings come from ``options`` (a :class:`SamplerOptions`) or, instead, as
    keywords (``simans_a=...``).
    """
    if options is not None and settings:
        raise ValueError("give the sampler settings either as options or as keywords, not both")
    o = options if options is not None else SamplerOptions.from_settings(settings)
    check_choice("sampling", sampling, SAMPLING)  # (an unknown name once ran potential's pick)
    from hardneg.strategies.base import StepContext

    strategy = sampler_strategy(sampling, o, num_negatives)
    plain = StepContext(generator=generator, fast=False, want_log_mass=False)
    rank_order = -torch.arange(scores.shape[1], dtype=torch.float64).expand(scores.shape) * 1e6

    def weights(selection, contrast) -> Tensor:
        log_w = selection.negative_log_weights
        if log_w is None:  # the strategy keeps every negative with weight 1
            log_w = torch.zeros_like(contrast.negative_logits)
        return log_w.masked_fill(~keep, float("-inf"))

    if sampling == "top":
        return rank_order.masked_fill(~keep, float("-inf")).topk(num_negatives, dim=1).indices, keep
    if sampling == "random":
        log_p = torch.zeros_like(scores, dtype=torch.float64).masked_fill(~keep, float("-inf"))
        return gumbel_top_k(log_p, num_negatives, generator), keep
    if sampling == "hcl":
        contrast = candidate_contrast(queries, scores, positive, keep, o.temperature)
        log_w = weights(strategy.select(contrast, plain), contrast)
        return gumbel_top_k(log_w, num_negatives, generator), keep
    if sampling == "simans":
        contrast = candidate_contrast(queries, scores, positive, keep, 1.0)
        drawn = torch.isfinite(weights(strategy.select(contrast, plain), contrast))
        # the drawn columns, most similar first (scores are sorted), then the others
        return rank_order.masked_fill(~drawn, float("-inf")).topk(
            num_negatives, dim=1
        ).indices, drawn
    if sampling == "ring":
        contrast = candidate_contrast(queries, scores, positive, keep, o.temperature)
        band = torch.isfinite(weights(strategy.select(contrast, plain), contrast))
        log_p = torch.zeros_like(scores, dtype=torch.float64).masked_fill(~band, float("-inf"))
        return gumbel_top_k(log_p, num_negatives, generator), band
    # potential: one Bernoulli draw per candidate with the loss's keep probability
    log_pi = strategy.log_keep(scores.double(), positive.double()[:, 0], keep)
    u = torch.rand(scores.shape, generator=generator, dtype=torch.float64)
    kept = keep & (u < log_pi.exp())
    return rank_order.masked_fill(~kept, float("-inf")).topk(num_negatives, dim=1).indices, kept


def mine_hard_negatives(
    queries: Sequence[str] | Any,
    positives: Sequence[str] | None = None,
    corpus: Sequence[str] | None = None,
    *,
    model: Any = None,
    num_negatives: int = 1,
    output_format: str | None = None,
    sampling: str = "top",
    range_min: int = 0,
    range_max: int | None = None,
    min_score: float | None = None,
    max_score: float | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    simans_a: float = _DEFAULTS.simans_a,
    simans_b: float = _DEFAULTS.simans_b,
    hcl_beta: float = _DEFAULTS.hcl_beta,
    temperature: float = _DEFAULTS.temperature,
    ring_rho_out: float = _DEFAULTS.ring_rho_out,
    ring_rho_in: float = _DEFAULTS.ring_rho_in,
    potential_a: float = _DEFAULTS.potential_a,
    potential_b: float = _DEFAULTS.potential_b,
    potential_clamp: float = _DEFAULTS.potential_clamp,
    batch_size: int = 64,
    query_chunk_size: int = 1024,
    corpus_chunk_size: int = 16384,
    cache_dir: str | Path | None = None,
    model_key: str | None = None,
    anchor_column: str = "anchor",
    positive_column: str = "positive",
    seed: int = 0,
    query_prompt: str | None = None,
    query_prompt_name: str | None = None,
    corpus_prompt: str | None = None,
    corpus_prompt_name: str | None = None,
    output_scores: bool = False,
    include_positives: bool = False,
    cross_encoder: Any = None,
    as_dataset: bool = False,
    return_stats: bool = False,
    verbose: bool = False,
    **other_options: Any,
) -> Any:
    """Mine ``num_negatives`` hard negatives per ``(query, positive)`` pair (see module doc).

    Args:
        queries: query texts, or a ``datasets.Dataset`` with ``anchor_column`` and
            ``positive_column`` (then ``positives`` must be None).
        positives: one positive text per query.
        corpus: candidate texts, each distinct text once (default: the distinct positives, as
            sentence-transformers does).
        model: anything with ``encode(texts, batch_size=..., convert_to_tensor=True)``
            (required; sentence-transformers' order ``mine_hard_negatives(dataset, model,
            ...)`` is taken too).
        num_negatives: negatives per query.
        output_format: (default ``'triplet'``, ``'n-tuple'`` with ``include_positives``)
            ``'triplet'`` (one row per negative), ``'n-tuple'`` (one row per
            query), ``'labeled-pair'`` (``anchor, positive, label``: 1 for each positive of an
            anchor, 0 for each of its mined negatives) or ``'labeled-list'`` (``anchor,
            positive, labels``: one row per distinct anchor, its positives then its negatives
            in ``positive`` and their 1 / 0 in ``labels``), sentence-transformers' formats for
            cross-encoder losses; an anchor's negatives are those mined for its pairs, each text
            once.
        sampling: ``'top'``, ``'random'``, ``'simans'``, ``'hcl'``, ``'ring'`` or
            ``'potential'``.
        range_min, range_max: rank window ``[range_min, range_max)`` of the candidates
            (default ``range_max = range_min + max(30, 3 num_negatives)``, capped by the
            most candidates a query has: the corpus less its own text and its positives; a
            query with fewer is short, like one the filters thin out).
        min_score, max_score: keep candidates with ``min_score <= s <= max_score``.
        absolute_margin: keep ``s <= s_pos - absolute_margin`` (TopK-MarginPos).
        relative_margin: keep ``s <= s_pos - |s_pos| relative_margin`` (TopK-PercPos).
        simans_a, simans_b: SimANS kernel ``exp(-a (s - s_pos - b)^2)``.
        hcl_beta, temperature: HCL weights ``exp(beta s / t)``.
        ring_rho_out, ring_rho_in: Ring's band over the surviving candidates.
        potential_a, potential_b, potential_clamp: potential-sample mining's keep probability
            ``min(clamp, exp(-a (s - s_pos - b)^2))``.
        batch_size: encoder batch.
        query_chunk_size, corpus_chunk_size: score block of the top-k.
        cache_dir: cache embeddings here.
        model_key: names the model in the cache key; default: :func:`model_fingerprint`, which
            follows a torch model's weights, so a fine-tuned model re-mining into the same
            ``cache_dir`` embeds again instead of reading the old model's embeddings.
        anchor_column, positive_column: column names of a dataset input, and of the anchor
            and positive in the rows mined (as sentence-transformers keeps a dataset's names).
        seed: seed of the sampling.
        query_prompt, query_prompt_name: the prompt (text, or a key of the model's
            ``prompts``) the queries are embedded with (E5's ``"query: "``), as
            sentence-transformers' ``mine_hard_negatives``; not both.
        corpus_prompt, corpus_prompt_name: the same for the corpus and the positives.
        output_scores: add the model's cosines: ``scores`` ``[s_pos, s_neg]`` per triplet,
            ``[s_pos, s_neg_1, ..., s_neg_k]`` per n-tuple (what ``MarginMSELoss`` reads), and
            ``score`` / ``scores`` in place of ``label`` / ``labels`` in the labeled formats.
        include_positives: rank the positives among the candidates instead of skipping
            them (sentence-transformers' ``include_positives``, for reranking evaluation sets:
            each pair's ``num_negatives`` best candidates, its positives in place, as one
            ``n-tuple`` row, the only format it takes); the positives missing from ``corpus``
            are added to it, and the query's own text stays out unless it is its positive.
            The window, the filters and the sampling still apply and may drop positives.
        cross_encoder: a reranker (anything with ``predict(pairs, batch_size=...)`` giving one
            score per ``(query, text)`` pair, e.g. a sentence-transformers ``CrossEncoder``):
            the candidates and positives are scored again by it, and every later step reads
            its scores (module doc, step 3).
        as_dataset: return a ``datasets.Dataset`` instead of a list of dicts.
        return_stats: also return :class:`MiningStats`.
        verbose: print a summary of the run (rows, mean scores, pairs short of negatives;
            sentence-transformers prints its own by default, here it is off by default).
        other_options: sentence-transformers' own arguments (``anchor_column_name``,
            ``sampling_strategy``, ``cache_folder``, ...) fail naming the equivalent here.
    """
    for key, value in other_options.items():
        if key in _ST_MINING_ARGUMENTS:
            raise ValueError(
                f"{key}={value!r} is an argument of sentence-transformers' mine_hard_negatives; "
                f"here: {_ST_MINING_ARGUMENTS[key]}"
            )
        raise TypeError(f"mine_hard_negatives() got an unexpected keyword argument {key!r}")
    if model is None and hasattr(queries, "column_names") and hasattr(positives, "encode"):
        # sentence-transformers' call, mine_hard_negatives(dataset, model, ...): the model
        # came second, in the place of the positives
        model, positives = positives, None
    if model is None:
        raise TypeError("mine_hard_negatives() needs the model: pass model=<SentenceTransformer>")
    stats = MiningStats()
    t0 = time.perf_counter()
    if hasattr(queries, "column_names"):
        if positives is not None:
            raise ValueError("give either a dataset or queries and positives, not both")
        queries, positives = _from_dataset(queries, anchor_column, positive_column)
    q_texts = _texts("queries", queries)
    p_texts = _texts("positives", positives)
    if len(q_texts) != len(p_texts):
        raise ValueError(
            f"queries and positives must have the same length, got {len(q_texts)} and {len(p_texts)}"
        )
    if not q_texts:
        raise ValueError("no queries to mine for")
    # a text repeated in the corpus is one candidate (as sentence-transformers deduplicates
    # it): each copy took a window rank and could be picked twice for one query
    c_texts = list(dict.fromkeys(p_texts if corpus is None else _texts("corpus", corpus)))
    check_flag("include_positives", include_positives)
    if include_positives:  # a ranking with the positives in place needs them as candidates
        c_texts = list(dict.fromkeys(c_texts + p_texts))
    if not c_texts:
        raise ValueError("the corpus is empty")
    num_negatives = int(check_number("num_negatives", num_negatives, low=1, integer=True))
    # a zero or negative size is a range() step: 0 raised a bare "range() arg 3", a negative
    # one embedded or ranked nothing (0 rows, exit 0)
    for name, value in (
        ("batch_size", batch_size),
        ("query_chunk_size", query_chunk_size),
        ("corpus_chunk_size", corpus_chunk_size),
    ):
        check_number(name, value, low=1, integer=True)
    if output_format is None:
        output_format = "n-tuple" if include_positives else "triplet"
    if output_format == "n-tuple-scores":  # sentence-transformers' deprecated spelling
        raise ValueError(
            "output_format='n-tuple-scores' is sentence-transformers' deprecated name; here: "
            "output_format='n-tuple', output_scores=True"
        )
    check_choice("output_format", output_format, FORMATS)
    if include_positives and output_format != "n-tuple":
        # sentence-transformers switches to n-tuple with a warning; a triplet or labeled row
        # would lose the ranking that include_positives is for
        raise ValueError(
            f"include_positives=True gives each pair's ranked candidates as one n-tuple row; "
            f"output_format={output_format!r} cannot hold them: use output_format='n-tuple'"
        )
    check_flag("verbose", verbose)
    check_flag("output_scores", output_scores)
    check_flag("as_dataset", as_dataset)
    check_flag("return_stats", return_stats)
    # int() read '1.5' as 1 and failed on 'a' naming no setting; torch's generator takes
    # seeds in [-2**63, 2**64)
    seed = int(check_number("seed", seed, integer=True, low=-(2**63), high=2**64 - 1))
    for name, value in (
        ("query_prompt", query_prompt),
        ("query_prompt_name", query_prompt_name),
        ("corpus_prompt", corpus_prompt),
        ("corpus_prompt_name", corpus_prompt_name),
    ):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    for side, text, name in (
        ("query", query_prompt, query_prompt_name),
        ("corpus", corpus_prompt, corpus_prompt_name),
    ):
        if text is not None and name is not None:
            raise ValueError(f"give {side}_prompt or {side}_prompt_name, not both")
    check_choice("sampling", sampling, SAMPLING)
    # positives are never negatives of their query: skip the corpus rows equal to any positive
    # of the same anchor text (an anchor listed with several positives keeps all of them out),
    # and the rows equal to the query itself (a text is not its own negative; it would only
    # take rank 0 of the window before a margin removed it)
    where: dict[str, list[int]] = {}
    for j, text in enumerate(c_texts):
        where.setdefault(text, []).append(j)
    of_anchor: dict[str, set[int]] = {}
    if include_positives:  # only the query's own text is skipped, unless it is its positive
        positives_of: dict[str, set[str]] = {}
        for q, p in zip(q_texts, p_texts):
            positives_of.setdefault(q, set()).add(p)
        of_anchor = {
            q: set() if q in ps else set(where.get(q, ())) for q, ps in positives_of.items()
        }
    else:
        for q, p in zip(q_texts, p_texts):
            of_anchor.setdefault(q, set(where.get(q, ()))).update(where.get(p, ()))
    exclude = [of_anchor[q] for q in q_texts]
    extra = max(len(e) for e in exclude)
    # the candidates a query can have: the corpus less its own text and positives. The limits
    # below take the query with the most left (they took the one with the fewest: an anchor
    # listed with many positives refused or narrowed every query's window); a query with
    # fewer finds -inf at the end of its window and is short, like one the filters thin out
    least = min(len(e) for e in exclude)
    available = len(c_texts) - least
    if available < num_negatives:
        raise ValueError(
            f"the corpus holds {len(c_texts)} texts; without a query's own text and its "
            f"positives (at least {least} rows) at most {available} candidates are left, fewer "
            f"than num_negatives = {num_negatives}: give a larger corpus"
        )
    range_min = int(check_number("range_min", range_min, low=0, integer=True))
    if range_max is None:
        # the default window is capped by the corpus, so a small data set mines out of the box
        range_max = min(range_min + max(30, 3 * num_negatives), available)
    range_max = int(check_number("range_max", range_max, low=1, integer=True))
    if range_max > available:
        raise ValueError(
            f"range_max = {range_max} is larger than the corpus allows: a query has at most "
            f"{available} candidates (the corpus's {len(c_texts)} texts less its own text and "
            f"its positives, at least {least} rows); lower range_max to at most {available}"
        )
    if range_max <= range_min:
        raise ValueError(f"range_max ({range_max}) must be larger than range_min ({range_min})")
    if range_max - range_min < num_negatives:
        raise ValueError(
            f"the window [range_min, range_max) = [{range_min}, {range_max}) holds fewer "
            f"candidates than num_negatives = {num_negatives}"
        )
    for name, value in (("absolute_margin", absolute_margin), ("relative_margin", relative_margin)):
        if value is not None:
            check_number(name, value, low=0.0)
    # bounds that no score can pass (a NaN, min above max) mined 0 rows after embedding the
    # whole corpus: a setting error, named before the model runs
    for name, value in (("min_score", min_score), ("max_score", max_score)):
        if value is not None:
            check_number(name, value)
    if min_score is not None and max_score is not None and min_score > max_score:
        raise ValueError(
            f"min_score ({min_score:g}) is above max_score ({max_score:g}): no score can pass "
            "both; min_score must be <= max_score"
        )
    options = SamplerOptions(
        simans_a=simans_a,
        simans_b=simans_b,
        hcl_beta=hcl_beta,
        temperature=temperature,
        ring_rho_out=ring_rho_out,
        ring_rho_in=ring_rho_in,
        potential_a=potential_a,
        potential_b=potential_b,
        potential_clamp=potential_clamp,
    )
    sampler_strategy(sampling, options, num_negatives)  # its settings, before any embedding
    stats.queries, stats.corpus = len(q_texts), len(c_texts)

    # every query's window rows rank before its excluded rows (set to -inf)
    k = min(range_max + extra, len(c_texts))

    rank, world = _world()
    lo, hi = shard_bounds(len(c_texts), rank, world)
    if cache_dir is not None and model_key is None:
        # the class name alone served a fine-tuned model its base model's embeddings
        model_key = model_fingerprint(model)
    embed_kw = {"batch_size": batch_size, "cache_dir": cache_dir, "model_key": model_key}
    query_kw = {**embed_kw, "prompt": query_prompt, "prompt_name": query_prompt_name}
    embed_kw.update(prompt=corpus_prompt, prompt_name=corpus_prompt_name)  # corpus, positives
    # an anchor listed with several positives is embedded once (retrieval data repeats anchors)
    distinct_q = list(dict.fromkeys(q_texts))
    q_row = {t: n for n, t in enumerate(distinct_q)}
    emb = {
        "corpus": embed_texts(model, c_texts[lo:hi], **embed_kw),  # this rank's shard only
        "queries": _embed_sharded(model, distinct_q, **query_kw)[[q_row[t] for t in q_texts]],
    }
    # positives already in the corpus reuse its embeddings; only the others are embedded
    in_corpus = sorted({where[p][0] for p in p_texts if p in where})
    mine = [j for j in in_corpus if lo <= j < hi]
    held = emb["corpus"][[j - lo for j in mine]] if mine else torch.zeros(0, 0)
    if world > 1:
        if not mine:  # an empty part still needs the embedding width to be gathered
            held = torch.zeros(0, emb["queries"].shape[1])
        held = _gather_rows(held)  # rank order = corpus order: the rows of in_corpus
    row_of = {c_texts[j]: held[n] for n, j in enumerate(in_corpus)}
    missing = list(dict.fromkeys(p for p in p_texts if p not in where))
    more = _embed_sharded(model, missing, **embed_kw)
    row_of.update({t: more[i] for i, t in enumerate(missing)})
    emb["positives"] = torch.stack([row_of[p] for p in p_texts])
    stats.seconds["embed"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores, index = sharded_top_k(
        emb["queries"],
        emb["corpus"],
        lo,
        k,
        exclude=exclude,
        query_chunk_size=query_chunk_size,
        corpus_chunk_size=corpus_chunk_size,
    )
    stats.seconds["top_k"] = time.perf_counter() - t1
    pos = (emb["queries"] * emb["positives"]).sum(dim=1, keepdim=True)
    if cross_encoder is not None:
        t1 = time.perf_counter()
        # the embedding model's range_max best candidates, ranked again by the cross-encoder
        scores, index = scores[:, :range_max], index[:, :range_max]
        scores, index, pos = rescore_candidates(
            cross_encoder, q_texts, p_texts, c_texts, scores, index, batch_size=batch_size
        )
        stats.seconds["rescore"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    # the positive's own rows were set to -inf, so they rank last: the window is [min, max)
    scores, index = scores[:, range_min:range_max], index[:, range_min:range_max]
    keep = torch.isfinite(scores)
    if min_score is not None:
        keep &= scores >= min_score
    if max_score is not None:
        keep &= scores <= max_score
    if absolute_margin is not None:
        keep &= scores <= pos - absolute_margin
    if relative_margin is not None:
        # s_pos - |s_pos| m: below the positive whatever its sign (s_pos (1 - m) is above a
        # negative s_pos)
        keep &= scores <= pos - pos.abs() * relative_margin

    gen = torch.Generator().manual_seed(int(seed))
    chosen, keep = pick_negatives(
        sampling,
        emb["queries"],
        scores,
        pos,
        keep,
        num_negatives,
        gen,
        options,
    )
    valid = keep.gather(1, chosen)
    chosen_scores = scores.gather(1, chosen)
    chosen_index = index.gather(1, chosen)

    rows: list[dict[str, Any]] = []
    neg_scores = []
    pos_scores = pos.squeeze(1).tolist()
    # the rows keep the input's column names, as sentence-transformers' rows do
    a_key, p_key = anchor_column, positive_column
    # the labeled formats: anchor -> {document: score} of its positives, and of its negatives
    labeled: dict[str, dict[str, float]] = {}
    negatives_of: dict[str, dict[str, float]] = {}
    for i in range(len(q_texts)):
        picks = [
            (float(chosen_scores[i, m]), int(chosen_index[i, m]))
            for m in range(num_negatives)
            if bool(valid[i, m])
        ]
        picks.sort(key=lambda x: -x[0])
        if len(picks) < num_negatives:
            stats.short_queries += 1
        neg_scores.extend(s for s, _ in picks)
        s_pos = pos_scores[i]
        if output_format == "triplet":
            for s_neg, j in picks:
                row = {a_key: q_texts[i], p_key: p_texts[i], "negative": c_texts[j]}
                rows.append({**row, "scores": [s_pos, s_neg]} if output_scores else row)
        elif output_format == "n-tuple":
            if len(picks) == num_negatives:
                row = {a_key: q_texts[i], p_key: p_texts[i]}
                row.update({f"negative_{m + 1}": c_texts[j] for m, (_, j) in enumerate(picks)})
                if output_scores:
                    row["scores"] = [s_pos, *(s_neg for s_neg, _ in picks)]
                rows.append(row)
        else:  # labeled: grouped by anchor below, each text once, in decreasing score
            labeled.setdefault(q_texts[i], {})[p_texts[i]] = s_pos
            found = negatives_of.setdefault(q_texts[i], {})
            for s_neg, j in picks:
                found.setdefault(c_texts[j], s_neg)
    if labeled:  # the anchors' positives (label 1) before their negatives (label 0)
        rows = _labeled_rows(
            labeled, negatives_of, output_format, output_scores, names=(a_key, p_key)
        )
    stats.rows = len(rows)
    stats.mean_positive_score = float(pos.mean())
    stats.mean_negative_score = float(np.mean(neg_scores)) if neg_scores else math.nan
    stats.seconds["select"] = time.perf_counter() - t2
    if verbose and rank == 0:  # every rank holds the same rows
        print(_summary(stats, num_negatives))
    out: Any = rows
    if as_dataset:
        from datasets import Dataset

        out = Dataset.from_list(rows)
    return (out, stats) if return_stats else out


def _summary(stats: MiningStats, num_negatives: int) -> str:
    """The lines ``verbose=True`` prints."""
    return "\n".join(
        [
            f"mined {stats.rows:,} rows for {stats.queries:,} pairs from a corpus of "
            f"{stats.corpus:,} texts",
            f"mean score: positive {stats.mean_positive_score:.4f}, negative "
            f"{stats.mean_negative_score:.4f}",
            f"{stats.short_queries:,} pairs found fewer than {num_negatives} negatives (widen "
            "range_max, lower range_min, loosen the margins or the score bounds for more)",
        ]
    )


def rescore_candidates(
    cross_encoder: Any,
    queries: Sequence[str],
    positives: Sequence[str],
    corpus: Sequence[str],
    scores: Tensor,
    index: Tensor,
    *,
    batch_size: int = 64,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(scores [Q, K], index [Q, K], positive scores [Q, 1])`` of the cross-encoder: each
    finite candidate ``index[i, m]`` of ``scores`` scored as the pair ``(queries[i],
    corpus[index[i, m]])``, the candidates of a row sorted by those scores (descending; the
    excluded ``-inf`` ones stay last), and each ``(queries[i], positives[i])`` pair scored.
    A query text repeated (an anchor with several positives) has the same candidates: its pairs
    are scored once. Under ``torch.distributed`` each rank scores a contiguous share of the
    distinct queries and of the positive pairs, and the shares are all-gathered: every rank
    returns what one process computes."""
    first: dict[str, int] = {}
    rows = [first.setdefault(q, i) for i, q in enumerate(queries)]
    distinct = sorted(set(rows))
    rank, world = _world()
    lo, hi = shard_bounds(len(distinct), rank, world)
    p_lo, p_hi = shard_bounds(len(queries), rank, world)
    finite = torch.isfinite(scores)
    pairs, where = [], []
    for n, i in enumerate(distinct[lo:hi]):
        for m in torch.nonzero(finite[i]).flatten().tolist():
            pairs.append((queries[i], corpus[int(index[i, m])]))
            where.append((n, m))
    own_positives = list(zip(queries[p_lo:p_hi], positives[p_lo:p_hi]))
    judged = _predict(cross_encoder, [*pairs, *own_positives], batch_size)
    part = torch.full((hi - lo, scores.shape[1]), float("-inf"), dtype=torch.float64)
    if where:
        at = torch.tensor(where)
        part[at[:, 0], at[:, 1]] = judged[: len(where)]
    positive = judged[len(where) :].unsqueeze(1)
    if world > 1:  # the shares in rank order: the distinct rows, then the pairs, in order
        part, positive = _gather_rows(part), _gather_rows(positive)
    # the rows of a repeated query text take its first row's candidates and scores
    position = {i: n for n, i in enumerate(distinct)}
    rescored = part[[position[r] for r in rows]]
    index = index[rows]
    order = torch.sort(rescored, dim=1, descending=True, stable=True).indices
    return (
        rescored.gather(1, order).to(scores.dtype),
        index.gather(1, order),
        positive.to(scores.dtype),
    )


def _predict(cross_encoder: Any, pairs: list[tuple[str, str]], batch_size: int) -> Tensor:
    """The cross-encoder's one score per pair, as a float64 tensor on the CPU."""
    if not hasattr(cross_encoder, "predict"):
        raise ValueError(
            "cross_encoder must have a predict(pairs, batch_size=...) method (a "
            f"sentence-transformers CrossEncoder), got {type(cross_encoder).__name__}"
        )
    if not pairs:  # (a rank whose share is empty)
        return torch.zeros(0, dtype=torch.float64)
    out = cross_encoder.predict(pairs, batch_size=batch_size, show_progress_bar=False)
    out = out.detach().cpu() if torch.is_tensor(out) else torch.as_tensor(np.asarray(out))
    out = out.to(torch.float64)
    if out.dim() != 1 or out.shape[0] != len(pairs):
        raise ValueError(
            f"the cross-encoder gave scores of shape {tuple(out.shape)} for {len(pairs)} pairs; "
            "mining needs one score per pair (a reranker with num_labels=1)"
        )
    if not torch.isfinite(out).all():
        raise ValueError("the cross-encoder gave a NaN or infinite score")
    return out


def _labeled_rows(
    positives: dict[str, dict[str, float]],
    negatives: dict[str, dict[str, float]],
    output_format: str,
    output_scores: bool,
    names: tuple[str, str] = ("anchor", "positive"),
) -> list[dict[str, Any]]:
    """Rows of the labeled formats (sentence-transformers' ``labeled-pair`` / ``labeled-list``)
    from each anchor's positives and mined negatives (document -> cosine; a mined negative
    that is another pair's positive of the same anchor cannot occur: positives are excluded).
    An anchor with no negative gets no ``labeled-list`` row, as sentence-transformers does.
    ``names``: the anchor's and the documents' column names."""
    a_key, p_key = names
    rows: list[dict[str, Any]] = []
    for anchor, docs in positives.items():
        negs = negatives.get(anchor, {})
        pairs = [(d, 1, s) for d, s in docs.items()] + [(d, 0, s) for d, s in negs.items()]
        if output_format == "labeled-pair":
            for doc, label, score in pairs:
                value = {"score": score} if output_scores else {"label": label}
                rows.append({a_key: anchor, p_key: doc, **value})
        elif negs:
            values = [score if output_scores else label for _, label, score in pairs]
            rows.append(
                {
                    a_key: anchor,
                    p_key: [doc for doc, _, _ in pairs],
                    ("scores" if output_scores else "labels"): values,
                }
            )
    return rows


def save_rows(rows: Any, path: str | Path) -> Path:
    """Write mined rows (list of dicts or a ``datasets.Dataset``) as ``.jsonl`` or ``.parquet``."""
    path = Path(path)
    records = rows.to_list() if hasattr(rows, "to_list") else list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        raise ValueError(f"output must end in .jsonl or .parquet, got {path.name!r}")
    return path


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read ``.jsonl``, ``.parquet`` or ``.csv`` rows, or a ``.txt`` of one text per line
    (``{"text": line}``; blank lines skipped), the inputs of ``hardneg mine``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return _read_rows(path)
    except UnicodeDecodeError as err:  # names neither the file nor what to do
        raise ValueError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        import csv

        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".txt":
        # a whitespace-only line is no text (it became a blank corpus entry, minable as a
        # negative), and spaces around a line would keep it from matching its positive
        lines = path.read_text(encoding="utf-8").splitlines()
        return [{"text": line.strip()} for line in lines if line.strip()]
    raise ValueError(f"input must be .jsonl, .parquet, .csv or .txt, got {path.name!r}")


def column_texts(
    rows: Sequence[Mapping[str, Any]],
    column: str,
    source: str | Path,
    option: str | None = None,
) -> list[str]:
    """The texts of one column of ``rows`` (read from ``source``); a row without the column or
    with a non-text value (null, a number) fails naming the file and the row (1-based), and
    ``option``, the setting that names another column, if there is one."""
    hint = f"; set {option} for another name" if option else ""
    texts = []
    for number, row in enumerate(rows, start=1):
        value = row.get(column)
        if not isinstance(value, str):
            if column not in row:
                what = "has no"
            elif value is None:
                what = "has null in"
            else:
                what = f"has {type(value).__name__} in"
            raise ValueError(
                f"{source}, row {number}: {what} column {column!r} (every row needs a text "
                f"there; its columns: {sorted(row)}{hint})"
            )
        texts.append(value)
    return texts


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; a bad line fails naming the file and its line number."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, an editor's empty last line)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}, line {number}: expected a JSON object with named columns, "
                f"got a {type(row).__name__}"
            )
        rows.append(row)
    return rows
