"""``hardneg train --modality text``: fine-tune a sentence model on your own rows with a strategy.

The rows are ``(anchor, positive[, negative_1, ..., negative_k])`` texts in a ``.jsonl``,
``.parquet`` or ``.csv`` file (what ``hardneg mine --format n-tuple`` or ``triplet`` writes); the
model trains in sentence-transformers' ``SentenceTransformerTrainer`` with
:class:`hardneg.integrations.sentence_transformers.HardNegativeLoss` (its Cached form with
``mini_batch_size=``), batches without duplicate texts (``BatchSamplers.NO_DUPLICATES``)::

    hardneg mine --data pairs.jsonl --num-negatives 3 --format n-tuple --output mined.parquet
    hardneg train --modality text data=mined.parquet strategy=hcl hcl.beta=0.5 --run-dir runs/hcl

A share ``dev_fraction`` of the rows (drawn with ``seed``) is held out: each distinct held-out
anchor queries the held-out positives and negatives, the positives of its rows being the
relevant ones (MRR@10, NDCG@10, R@1, Recall@10, as sentence-transformers'
``InformationRetrievalEvaluator`` reports them), before and after training. The run folder gets ``model/`` (``SentenceTransformer.save``, with the model
card), ``history.csv`` (step, epoch, loss, learning rate), ``metrics.json`` and ``config.json``.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hardneg.contrast import GUIDE_MARGIN_MODES
from hardneg.text.benchmark import retrieval_metrics, split_setting

if TYPE_CHECKING:
    from hardneg.text.beir import BeirData


@dataclass
class TextTrainConfig:
    """Settings of ``hardneg train --modality text`` (``key=value`` on the command line)."""

    data: str | None = None  # the rows: .jsonl / .parquet / .csv, or a BEIR folder (required)
    split: str | None = None  # the qrels split of a BEIR folder (default: train)
    columns: str | None = None  # "anchor,positive,negative_1": default every column in order
    model: str = "all-MiniLM-L6-v2"  # name or path (hardneg.text.models.load_sentence_model)
    strategy: str = "infonce"
    scale: float = 20.0
    symmetric: bool = False
    # MultipleNegativesRankingLoss's blocks, comma-separated ("query_to_doc,doc_to_query")
    directions: str | None = None
    partition_mode: str | None = None  # joint (default) or per_direction
    contrast_anchors: bool = False  # GISTEmbedLoss's: the other anchors as candidates
    contrast_positives: bool = False  # GISTEmbedLoss's: each positive against the others
    mask_duplicates: bool = True
    mini_batch_size: int = 0  # > 0: CachedHardNegativeLoss (GradCache) with this many rows
    guide: str | None = None  # a guide model's name or path (GISTEmbed's false negatives)
    guide_margin: float = 0.0
    guide_margin_strategy: str = "absolute"
    epochs: float = 1.0
    max_steps: int = -1  # > 0: stop after this many steps (overrides epochs)
    batch_size: int = 32
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    max_seq_length: int = 0  # 0: the model's own
    matryoshka_dims: str | None = None  # "384,256,128": MatryoshkaLoss around the loss
    query_prompt: str | None = None  # put before each anchor (E5: "query: ")
    document_prompt: str | None = None  # before each positive and negative ("passage: ")
    dev_fraction: float = 0.1  # held-out rows for the retrieval score (0: none)
    eval_data: str | None = None  # a BEIR folder scored before and after training (full corpus)
    eval_split: str | None = None  # its qrels split (default: test)
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)

    @classmethod
    def with_overrides(cls, items: Sequence[str]) -> TextTrainConfig:
        """``key=value`` items; an unknown key or a value of the wrong type fails naming the
        key and what it takes."""
        cfg = cls()
        kinds = {f.name: type(f.default) for f in fields(cls)}
        for item in items:
            key, value = split_setting(
                item,
                kinds,
                "text training setting",
                " (or STRATEGY.KEY=value for a strategy's hyper-parameter)",
            )
            # a prompt keeps its spaces ("query: "); other values are trimmed
            text = value if key.endswith("_prompt") else value.strip()
            setattr(cfg, key, _parse(key, text, kinds[key]))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        from hardneg._checks import check_choice, check_number
        from hardneg.registry import strategy_class

        if not self.data:
            raise ValueError(
                "data=FILE is required: (anchor, positive[, negatives]) rows in .jsonl, "
                ".parquet or .csv (e.g. the output of hardneg mine), or a BEIR folder"
            )
        strategy_class(self.strategy)  # an unknown name fails with the closest valid one
        check_number("scale", self.scale, low=0.0, low_inclusive=False)
        check_number("epochs", self.epochs, low=0.0, low_inclusive=False)
        check_number("batch_size", self.batch_size, low=2, integer=True)
        check_number("lr", self.lr, low=0.0, low_inclusive=False)
        check_number("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        check_number("dev_fraction", self.dev_fraction, low=0.0, high=0.5)
        check_number("mini_batch_size", self.mini_batch_size, low=0, integer=True)
        check_number("max_seq_length", self.max_seq_length, low=0, integer=True)
        check_number("threads", self.threads, low=0, integer=True)
        check_number("guide_margin", self.guide_margin, low=0.0)
        check_choice("guide_margin_strategy", self.guide_margin_strategy, GUIDE_MARGIN_MODES)
        partition_set = self.directions is not None or self.partition_mode is not None
        if partition_set or self.contrast_anchors or self.contrast_positives:
            # checked now, not when the loss is built after the data and the model are loaded
            from hardneg.integrations.sentence_transformers import resolve_partition

            resolve_partition(
                self.symmetric,
                self.direction_names(),
                self.partition_mode,
                self.contrast_anchors,
                self.contrast_positives,
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 (use epochs) or >= 1, got {self.max_steps}")
        from hardneg.text.models import check_model_name

        check_model_name(self.model)
        if self.guide is not None:
            check_model_name(self.guide)
        self.dims()

    def direction_names(self) -> tuple[str, ...] | None:
        """``directions`` as a tuple of names (None: the loss's default)."""
        if self.directions is None:
            return None
        return tuple(d.strip() for d in str(self.directions).split(",") if d.strip())

    def dims(self) -> list[int] | None:
        """``matryoshka_dims`` as integers (None: no MatryoshkaLoss)."""
        if not self.matryoshka_dims:
            return None
        try:
            dims = [int(d) for d in str(self.matryoshka_dims).split(",") if d.strip()]
        except ValueError:
            dims = []
        if not dims or min(dims) < 1:
            raise ValueError(
                "matryoshka_dims takes comma-separated positive integers (e.g. 384,256,128), "
                f"got {self.matryoshka_dims!r}"
            )
        return dims


def _parse(key: str, value: str, kind: type) -> Any:
    if value.lower() in ("none", "null", "") and kind is not bool:
        if kind is type(None):  # a setting whose default is None
            return None
        raise ValueError(f"{key} needs a value, got {value!r}")
    if kind is bool:
        truth = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if value.lower() not in truth:
            raise ValueError(f"{key} takes true or false, got {value!r}")
        return truth[value.lower()]
    try:
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{key} takes {what}, got {value!r}") from None
    return value


# -- data ---------------------------------------------------------------------------------------
def load_columns(data: str, columns: str | None = None) -> tuple[list[str], list[list[str]]]:
    """``(names, texts per column)`` of the rows in the file ``data``: the comma-separated
    ``columns``, else every column but a label / score; at least an anchor and a positive
    column, every row a text in each."""
    from hardneg.mining import column_texts, load_rows

    path = Path(str(data))
    rows = load_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    if columns:
        names = [c.strip() for c in columns.split(",") if c.strip()]
    else:  # every column of the first row but a label / score (as sentence-transformers)
        names = [c for c in rows[0] if c not in ("label", "labels", "score", "scores")]
    if len(names) < 2:
        raise ValueError(
            f"{path}: training needs an anchor and a positive column (then any hard negatives), "
            f"got the columns {names}; name them with columns=anchor,positive[,negative_1,...]"
        )
    texts = [column_texts(rows, name, path, option="columns=") for name in names]
    return names, texts


def shared_beir_splits(cfg: TextTrainConfig) -> tuple[BeirData | None, BeirData | None]:
    """``(cfg.split of data=, cfg.eval_split of eval_data=)`` read together when ``data`` and
    ``eval_data`` name the same BEIR folder: its corpus and queries are read once for both
    (:func:`hardneg.text.beir.load_beir_splits`); ``(None, None)`` otherwise, each then read
    by :func:`training_columns` and :func:`evaluation_folder`."""
    from hardneg.text.beir import is_beir_folder, load_beir_splits

    if cfg.eval_data is None or cfg.columns is not None:  # (columns= on a folder is refused)
        return None, None
    if not (is_beir_folder(str(cfg.data)) and is_beir_folder(cfg.eval_data)):
        return None, None
    folder = Path(str(cfg.data)).expanduser().resolve()
    if folder != Path(cfg.eval_data).expanduser().resolve():
        return None, None
    train_split, eval_split = cfg.split or "train", cfg.eval_split or "test"
    read = load_beir_splits(folder, [train_split, eval_split])
    return read[train_split], read[eval_split]


def training_columns(
    cfg: TextTrainConfig, data: BeirData | None = None
) -> tuple[list[str], list[list[str]]]:
    """``(names, texts per column)`` of ``cfg.data``: :func:`load_columns` of a file, or the
    ``(anchor, positive)`` pairs of a BEIR folder's ``cfg.split`` (judgements of grade >= 1;
    :meth:`hardneg.text.beir.BeirData.pairs`), ``data`` if that split is read already."""
    from hardneg.text.beir import is_beir_folder, load_beir

    if not is_beir_folder(str(cfg.data)):
        if cfg.split is not None:
            raise ValueError(f"split= names a qrels split of a BEIR folder; {cfg.data} is a file")
        return load_columns(str(cfg.data), cfg.columns)
    if cfg.columns is not None:
        raise ValueError("columns= is for a file of rows; a BEIR folder's qrels give the pairs")
    if data is None:
        data = load_beir(str(cfg.data), cfg.split or "train")
    anchors, positives = data.pairs()
    if not anchors:
        raise ValueError(f"{cfg.data}: split {cfg.split or 'train'} has no judgement of grade >= 1")
    return ["anchor", "positive"], [anchors, positives]


def evaluation_folder(cfg: TextTrainConfig, data: BeirData | None = None) -> BeirData | None:
    """The BEIR split ``cfg.eval_data`` / ``cfg.eval_split`` scored before and after training
    (:class:`hardneg.text.beir.BeirData`; ``data`` if it is read already), or None."""
    from hardneg.text.beir import is_beir_folder, load_beir

    if cfg.eval_data is None:
        if cfg.eval_split is not None:
            raise ValueError("eval_split= names a split of eval_data=, which is not given")
        return None
    if not is_beir_folder(cfg.eval_data):
        raise ValueError(
            f"eval_data= takes a BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv), "
            f"got {cfg.eval_data}; held-out rows of data= are scored with dev_fraction="
        )
    return data if data is not None else load_beir(cfg.eval_data, cfg.eval_split or "test")


def split_rows(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, dev)`` row indices: ``round(fraction count)`` rows drawn with ``seed`` held
    out (at least 2 when ``fraction > 0``: one query and a second candidate)."""
    order = np.random.default_rng(seed).permutation(count)
    dev = 0 if fraction == 0 else max(2, int(round(fraction * count)))
    if count - dev < 2:
        raise ValueError(
            f"{count} rows leave {count - dev} to train on after holding out {dev} "
            "(dev_fraction): give more rows or dev_fraction=0"
        )
    return np.sort(order[dev:]), np.sort(order[:dev])


def sentence_encoder(model, batch_size: int = 64) -> Callable[..., np.ndarray]:
    """``encode(texts, prompt=None)``: the model's embeddings as numpy, in batches of
    ``batch_size``, the prompt put before each text (the ``encode`` :func:`dev_retrieval`
    takes)."""

    def encode(texts: list[str], prompt: str | None = None) -> np.ndarray:
        return model.encode(
            texts,
            prompt=prompt,
            batch_size=batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    return encode


def dev_retrieval(
    encode: Callable[..., np.ndarray],
    columns: list[list[str]],
    rows: np.ndarray,
    prompts: tuple[str | None, str | None] = (None, None),
) -> dict[str, float]:
    """Retrieval over the rows ``rows`` of ``columns`` (anchor, positive, negatives...): each
    distinct anchor text queries the rows' positives and negatives (each text once); its
    relevant documents are the positives of its rows. ``prompts``: the anchors' and the
    documents' prompts (``encode(texts, prompt)``). See :func:`retrieval_metrics`."""
    relevant: dict[str, set[str]] = {}
    for i in rows:
        relevant.setdefault(columns[0][i], set()).add(columns[1][i])
    queries = list(relevant)
    candidates = list(dict.fromkeys(columns[c][i] for c in range(1, len(columns)) for i in rows))
    where = {text: j for j, text in enumerate(candidates)}
    q, c = encode(queries, prompts[0]), encode(candidates, prompts[1])
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    return retrieval_metrics(q @ c.T, [{where[d] for d in relevant[t]} for t in queries])


# -- training -----------------------------------------------------------------------------------
def _column_prompts(
    keys: list[str], query: str | None, document: str | None
) -> dict[str, str] | None:
    """sentence-transformers' ``prompts`` per column: the query prompt for the anchors, the
    document prompt for the positives and negatives (None: no prompt)."""
    out = {key: (query if key == "anchor" else document) for key in keys}
    out = {key: prompt for key, prompt in out.items() if prompt is not None}
    return out or None


def _beir_scores(
    encode: Callable[..., np.ndarray],
    beir: BeirData,
    prompts: tuple[str | None, str | None],
    when: str,
    cfg: TextTrainConfig,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """``eval_data``'s full-corpus scores as ``beir_<measure>_<when>`` (and its sizes)."""
    from hardneg.text.beir import evaluate_beir

    scores = evaluate_beir(encode, beir, prompts=prompts)
    sizes = {f"beir_{k}": int(scores.pop(k)) for k in ("queries", "documents")}
    log(
        f"{cfg.eval_data} ({cfg.eval_split or 'test'}) {when} training: nDCG@10 "
        f"{scores['ndcg@10']:.4f}, MRR@10 {scores['mrr@10']:.4f}, Recall@100 "
        f"{scores['recall@100']:.4f}"
    )
    return {**sizes, **{f"beir_{k}_{when}": v for k, v in scores.items()}}


def _metrics_line(m: dict[str, float]) -> str:
    return (
        f"MRR@10 {m['mrr']:.3f}, NDCG@10 {m['ndcg_10']:.3f}, R@1 {m['recall_1']:.1f}%, "
        f"Recall@10 {m['recall_10']:.1f}%"
    )


def _warmup(ratio: float) -> dict[str, float]:
    """The warm-up share in the spelling of the installed transformers: ``warmup_steps`` as a
    float below 1 from v5 on (``warmup_ratio`` is deprecated there), ``warmup_ratio`` before."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"warmup_steps": float(ratio)} if major >= 5 else {"warmup_ratio": float(ratio)}


def train_text(
    cfg: TextTrainConfig,
    strategy_hparams: dict[str, Any],
    run_dir: Path,
    *,
    progress_bar: bool = True,
    log: Callable[[str], None] = print,
    step_logs: bool = True,
) -> dict[str, Any]:
    """Train, evaluate on the held-out rows and save; returns the metrics written.

    ``progress_bar``: the Trainer's bar, drawn only when stderr is a terminal. Without the bar
    the Trainer prints each step's logs instead; with ``progress_bar=False`` and
    ``step_logs=False`` (``hardneg train --modality text --quiet``) it prints neither.
    """
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    try:  # (sentence-transformers >= 6 moved it; the old path warns)
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    except ImportError:
        from sentence_transformers.training_args import BatchSamplers

    from hardneg.integrations.sentence_transformers import (
        CachedHardNegativeLoss,
        HardNegativeLoss,
        ProgressCallback,
    )
    from hardneg.text.models import library_bars_on_terminal_only, load_sentence_model

    # read before the model loads: a bad folder fails at once; one read of a folder that
    # data= and eval_data= both name (its corpus is most of it)
    train_split, eval_split = shared_beir_splits(cfg)
    names, columns = training_columns(cfg, train_split)
    beir = evaluation_folder(cfg, eval_split)
    train_rows, dev_rows = split_rows(len(columns[0]), cfg.dev_fraction, cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_sentence_model(cfg.model)
    if cfg.max_seq_length:
        model.max_seq_length = cfg.max_seq_length
    guide = load_sentence_model(cfg.guide) if cfg.guide else None
    loss_kwargs: dict[str, Any] = dict(
        scale=cfg.scale,
        symmetric=cfg.symmetric,
        directions=cfg.direction_names(),
        partition_mode=cfg.partition_mode,
        contrast_anchors=cfg.contrast_anchors,
        contrast_positives=cfg.contrast_positives,
        mask_duplicates=cfg.mask_duplicates,
        seed=cfg.seed,
        **strategy_hparams,
    )
    if guide is not None:
        loss_kwargs.update(
            guide=guide,
            guide_margin=cfg.guide_margin,
            guide_margin_strategy=cfg.guide_margin_strategy,
        )
    if cfg.mini_batch_size:
        loss = CachedHardNegativeLoss(
            model, cfg.strategy, mini_batch_size=cfg.mini_batch_size, **loss_kwargs
        )
    else:
        loss = HardNegativeLoss(model, cfg.strategy, **loss_kwargs)
    trained_loss = loss
    dims = cfg.dims()
    if dims:
        try:  # (sentence-transformers >= 6; the old path warns there)
            from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss
        except ImportError:
            from sentence_transformers.losses import MatryoshkaLoss

        width = (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )()
        if max(dims) > width:
            raise ValueError(f"matryoshka_dims {dims}: the model's embeddings have {width} dims")
        trained_loss = MatryoshkaLoss(model, loss, dims)

    encode = sentence_encoder(model)
    metrics: dict[str, Any] = {
        "strategy": cfg.strategy,
        "train_rows": int(train_rows.size),
        "dev_rows": int(dev_rows.size),
        "columns": names,
    }
    prompts = (cfg.query_prompt, cfg.document_prompt)

    def held_out_scores(when: str) -> dict[str, Any]:
        """The held-out rows' and ``eval_data``'s scores, keyed ``..._<when>``, and logged."""
        out: dict[str, Any] = {}
        if dev_rows.size:
            scores = dev_retrieval(encode, columns, dev_rows, prompts)
            out.update({f"dev_{k}_{when}": v for k, v in scores.items()})
            label = f"held-out retrieval {when} training:".ljust(35)  # before / after aligned
            log(f"{label} {_metrics_line(scores)}")
        if beir is not None:
            out.update(_beir_scores(encode, beir, prompts, when, cfg, log))
        return out

    metrics.update(held_out_scores("before"))
    # the column names the loss sees: anchor, positive, negative_1..k (sentence-transformers
    # reads the columns in order; the names only label them)
    keys = ["anchor", "positive", *(f"negative_{i}" for i in range(1, len(names) - 1))]
    train_data = Dataset.from_dict(
        {key: [column[i] for i in train_rows] for key, column in zip(keys, columns)}
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(run_dir / "trainer"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        **_warmup(cfg.warmup_ratio),
        seed=cfg.seed,
        data_seed=cfg.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        prompts=_column_prompts(keys, cfg.query_prompt, cfg.document_prompt),
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_pin_memory=torch.cuda.is_available(),  # (a warning on a CPU-only machine)
        # a bar only on a terminal (as the image trainer's tqdm(disable=None)): in a log file
        # or a pipe each refresh is one more line
        disable_tqdm=not (progress_bar and sys.stderr.isatty()),
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        loss=trained_loss,
        callbacks=[ProgressCallback(loss)],
    )
    if not step_logs and not progress_bar:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # what the Trainer adds in the bar's place
    trainer.train()
    try:  # the Trainer's output_dir: nothing is saved there (save_strategy "no"), so it is empty
        (run_dir / "trainer").rmdir()
    except OSError:  # not empty (something was written after all): kept for the user
        pass
    history = [
        {
            "step": entry["step"],
            "epoch": entry.get("epoch"),
            "loss": entry["loss"],
            "lr": entry.get("learning_rate"),
        }
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    if not history or not all(math.isfinite(h["loss"]) for h in history):
        raise FloatingPointError(
            f"training logged a non-finite loss (strategy {cfg.strategy}); see {run_dir}"
        )
    with (run_dir / "history.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "epoch", "loss", "lr"])
        writer.writeheader()
        writer.writerows(history)
    metrics.update(steps=int(trainer.state.global_step), final_loss=float(history[-1]["loss"]))
    metrics.update(held_out_scores("after"))
    with library_bars_on_terminal_only():  # transformers' "Writing model shards" bar
        model.save(str(run_dir / "model"))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    config = {**asdict(cfg), "strategy_hparams": strategy_hparams}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return metrics
