"""``hardneg mine``: offline hard-negative mining (:func:`hardneg.mining.mine_hard_negatives`).

Under ``torchrun --nproc-per-node N hardneg mine ...`` (or ``python -m torch.distributed.run``)
each process embeds and ranks its shard of the corpus, the top-k lists are merged, and rank 0
writes the output (the same rows as one process).

Example::

    hardneg mine --data pairs.jsonl --model all-MiniLM-L6-v2 --num-negatives 3 \\
        --sampling simans --relative-margin 0.05 --format n-tuple --output mined.parquet
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from hardneg.mining import SamplerOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        help="(anchor, positive) rows: .jsonl/.parquet/.csv; or a BEIR folder (corpus.jsonl, "
        "queries.jsonl, qrels/SPLIT.tsv): a pair per judgement of grade >= 1 in --split, the "
        "candidates its whole corpus",
    )
    parser.add_argument("--split", help="the qrels split of a BEIR folder --data (default: train)")
    parser.add_argument(
        "--corpus",
        help="candidate texts: .txt (one per line) or rows with --corpus-column (default: the positives)",
    )
    parser.add_argument(
        "--corpus-column",
        default="text",
        help="text column of --corpus rows (default: %(default)s)",
    )
    parser.add_argument(
        "--anchor-column", default="anchor", help="query column of --data (default: %(default)s)"
    )
    parser.add_argument(
        "--positive-column",
        default="positive",
        help="positive column of --data (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        default="all-MiniLM-L6-v2",
        help="name or path (default: %(default)s; the packaged MiniLM needs no hub)",
    )
    parser.add_argument("--output", required=True, help="output file, .jsonl or .parquet")
    parser.add_argument(
        "--format",
        dest="output_format",
        default=None,
        choices=["triplet", "n-tuple", "labeled-pair", "labeled-list"],
        help="triplet: one (anchor, positive, negative) row per negative; n-tuple: one "
        "(anchor, positive, negative_1..k) row per query; labeled-pair: (anchor, positive, "
        "label) rows, 1 for a positive and 0 for a negative; labeled-list: one (anchor, "
        "[documents], [labels]) row per anchor (cross-encoder losses) (default: triplet; n-tuple "
        "with --include-positives)",
    )
    parser.add_argument(
        "--include-positives",
        action="store_true",
        help="rank each query's positives among its candidates instead of skipping them "
        "(sentence-transformers' include_positives: reranking evaluation sets); n-tuple rows",
    )
    for side, what in (("query", "the queries"), ("corpus", "the corpus and the positives")):
        parser.add_argument(
            f"--{side}-prompt",
            help=f"text put before each of {what} when embedding (E5: 'query: ' / 'passage: ')",
        )
        parser.add_argument(
            f"--{side}-prompt-name",
            help=f"the model's own prompt (a key of its prompts) for {what}",
        )
    parser.add_argument(
        "--cross-encoder",
        help="a reranker (CrossEncoder name or folder) that scores the model's range-max best "
        "candidates and the positives again; the window, filters, margins, sampling and "
        "--output-scores then read its scores (on its own scale, e.g. 0..1)",
    )
    parser.add_argument(
        "--output-scores",
        action="store_true",
        help="add the model's cosines: a scores column [positive, negatives...] (triplet, "
        "n-tuple: what MarginMSELoss reads), score / scores instead of label / labels "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--num-negatives", type=int, default=1, help="negatives per query (default: %(default)s)"
    )
    parser.add_argument(
        "--sampling",
        default="top",
        choices=["top", "random", "simans", "hcl", "ring", "potential"],
        help="how the negatives are picked among the candidates (default: %(default)s)",
    )
    parser.add_argument(
        "--range-min", type=int, default=0, help="first candidate rank (default: %(default)s)"
    )
    parser.add_argument(
        "--range-max",
        type=int,
        help="end of the candidate ranks (default: range-min + max(30, 3 num-negatives), "
        "capped by the corpus)",
    )
    parser.add_argument("--min-score", type=float, help="keep candidates scoring >= this")
    parser.add_argument("--max-score", type=float, help="keep candidates scoring <= this")
    parser.add_argument(
        "--absolute-margin", type=float, help="keep s <= s_pos - margin (TopK-MarginPos)"
    )
    parser.add_argument(
        "--relative-margin", type=float, help="keep s <= s_pos - |s_pos| margin (TopK-PercPos)"
    )
    for option in dataclasses.fields(SamplerOptions):  # --simans-a, --hcl-beta, ...
        parser.add_argument(
            "--" + option.name.replace("_", "-"),
            type=float,
            default=option.default,
            help="(default: %(default)s)",
        )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="encoder batch (default: %(default)s)"
    )
    parser.add_argument("--query-chunk-size", type=int, default=1024, help="(default: %(default)s)")
    parser.add_argument(
        "--corpus-chunk-size", type=int, default=16384, help="(default: %(default)s)"
    )
    parser.add_argument("--cache-dir", help="cache embeddings here")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the sampling (default: %(default)s)"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:1, mps (default: %(default)s)"
    )


def _check_device(device: str) -> None:
    """A device string that torch cannot parse or that this machine lacks fails in one line
    (torch raises a RuntimeError with a stack trace when the model is moved there)."""
    from hardneg.train.runtime import check_device_option

    check_device_option(device)


def run(args: argparse.Namespace) -> int:
    from hardneg import distributed
    from hardneg.mining import mine_hard_negatives, save_rows
    from hardneg.text.models import check_model_name, load_sentence_model, resolve_model

    # the output's format is checked before the model is loaded and the corpus embedded
    if Path(args.output).suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"--output must end in .jsonl or .parquet, got {args.output!r}")
    check_model_name(args.model)  # a misspelt name: "did you mean", before the data are read
    if args.cross_encoder:
        check_model_name(args.cross_encoder)
    from hardneg.train.runtime import run_dir_problem

    if Path(args.output).is_dir():  # open() failed on it only after the whole mining
        raise ValueError(f"--output {args.output} is a folder; give a file name (.jsonl, .parquet)")
    problem = run_dir_problem(Path(args.output).parent)  # a folder we cannot write to
    if problem:
        raise ValueError(f"--output {args.output}: {problem}")
    ctx = distributed.init_distributed()  # torchrun: each process ranks its corpus shard
    from hardneg.text.beir import is_beir_folder

    if is_beir_folder(args.data):
        anchors, positives, corpus = _beir_inputs(args)
    else:
        anchors, positives, corpus = _row_inputs(args)
    device = args.device
    if ctx.world_size > 1 and device == "cuda":
        device = str(ctx.device)  # one GPU per process
    _check_device(device)
    model = _ModelOnFirstUse(lambda: load_sentence_model(args.model, device=device))
    cross_encoder = None
    if args.cross_encoder:
        from hardneg.text.models import load_cross_encoder

        cross_encoder = _ModelOnFirstUse(
            lambda: load_cross_encoder(args.cross_encoder, device=device), method="predict"
        )
    keys = (
        "output_format num_negatives sampling range_min range_max min_score max_score "
        "absolute_margin relative_margin batch_size query_chunk_size corpus_chunk_size cache_dir seed "
        "output_scores query_prompt query_prompt_name corpus_prompt corpus_prompt_name "
        "include_positives"
    ).split() + [f.name for f in dataclasses.fields(SamplerOptions)]
    try:
        mined, stats = mine_hard_negatives(
            anchors,
            positives,
            corpus,
            model=model,
            cross_encoder=cross_encoder,
            model_key=_cache_key(resolve_model(args.model)),
            return_stats=True,
            **{k: getattr(args, k) for k in keys},
        )
    except ValueError as err:
        raise ValueError(_flag_names(str(err), keys)) from None
    if not ctx.is_main:
        return 0  # every rank holds the same rows; rank 0 writes them
    path = save_rows(mined, args.output)
    print(
        f"mined {stats.rows} rows for {stats.queries} queries from a corpus of {stats.corpus} "
        f"({stats.short_queries} queries with fewer than {args.num_negatives} negatives) -> {path}"
    )
    if stats.rows == 0:  # a legitimate outcome, but never a silent one
        print(_no_rows_hint(args), file=sys.stderr)
    from hardneg.commands import status_printer

    status_printer(args)(  # timings: not the result, hidden by --quiet
        "seconds: "
        + ", ".join(f"{k} {v:.2f}" for k, v in stats.seconds.items())
        + f"; mean score: positive {stats.mean_positive_score:.3f}, negative {stats.mean_negative_score:.3f}"
    )
    return 0


def _row_inputs(args: argparse.Namespace) -> tuple[list[str], list[str], list[str] | None]:
    """The (anchor, positive) columns of the rows file ``--data`` and the ``--corpus`` texts
    (None: the positives)."""
    from hardneg.mining import column_texts, load_rows

    if Path(args.data).is_dir():  # not a BEIR folder: "must be .jsonl, ..., got 'name'"
        raise ValueError(
            f"--data {args.data} is a folder without corpus.jsonl: give a rows file "
            "(.jsonl, .parquet, .csv) or a BEIR folder (corpus.jsonl, queries.jsonl, "
            "qrels/SPLIT.tsv)"
        )
    if args.split is not None:
        raise ValueError(f"--split names a qrels split of a BEIR folder; {args.data} is a file")
    rows = load_rows(args.data)
    if not rows:
        raise ValueError(f"{args.data} holds no rows")
    found = sorted(rows[0])
    for col in (args.anchor_column, args.positive_column):
        if col not in rows[0]:
            raise ValueError(
                f"{args.data}: expected the layout ({args.anchor_column}, {args.positive_column}); "
                f"found columns {found} (set --anchor-column / --positive-column)"
            )
    anchors = column_texts(rows, args.anchor_column, args.data, "--anchor-column")
    positives = column_texts(rows, args.positive_column, args.data, "--positive-column")
    corpus = None
    if args.corpus:
        crow = load_rows(args.corpus)
        if crow and args.corpus_column not in crow[0]:
            raise ValueError(
                f"{args.corpus}: expected a column {args.corpus_column!r}, found {sorted(crow[0])}"
            )
        corpus = column_texts(crow, args.corpus_column, args.corpus, "--corpus-column")
    return anchors, positives, corpus


def _beir_inputs(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """The pairs of a BEIR folder's ``--split`` (grade >= 1) and its whole corpus. A query's
    judged-relevant documents are its positives, so none of them is mined as its negative."""
    from hardneg.text.beir import load_beir

    for flag, value, default in (
        ("--corpus", args.corpus, None),
        ("--corpus-column", args.corpus_column, "text"),
        ("--anchor-column", args.anchor_column, "anchor"),
        ("--positive-column", args.positive_column, "positive"),
    ):
        if value != default:
            raise ValueError(
                f"{flag} is for files of rows; the BEIR folder's corpus.jsonl is the corpus and "
                "its queries and qrels give the pairs"
            )
    data = load_beir(args.data, args.split or "train")
    anchors, positives = data.pairs()
    if not anchors:
        raise ValueError(
            f"{args.data}: split {args.split or 'train'} has no judgement of grade >= 1"
        )
    return anchors, positives, list(data.corpus.values())


def _flag_names(message: str, keys: list[str]) -> str:
    """The library's message with its keyword names as this command's flags:
    ``range_max (39) must be larger than range_min (50)`` -> ``--range-max (39) ... --range-min``.
    Only names with an underscore are replaced (``seed`` is also a word of the messages)."""
    flags = {k: "--" + k.replace("_", "-") for k in keys if "_" in k}
    flags["output_format"] = "--format"
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, flags)) + r")(?!\w)")
    message = pattern.sub(lambda m: flags[m.group(1)], message)
    # keyword values as typed on the command line: "--include-positives=True" is the flag
    # alone, "--format='n-tuple'" is "--format n-tuple"
    message = re.sub(r"(--[a-z][\w-]*)=True\b", r"\1", message)
    return re.sub(r"(--[a-z][\w-]*)='([^'\s]*)'", r"\1 \2", message)


def _cache_key(model: str) -> str:
    """The model's name in the embedding cache: the name or path, and for a local folder its
    files' names, sizes and modification times, so a model trained and saved again to the same
    folder is embedded again (the path alone served the old embeddings), while an unchanged one
    is still never loaded when its embeddings are cached."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return model
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    stamps = [f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return model + "|" + ";".join(stamps)


def _no_rows_hint(args: argparse.Namespace) -> str:
    """What to loosen when no query kept ``--num-negatives`` negatives."""
    loosen = [
        f"lower --num-negatives (now {args.num_negatives})",
        "widen the window (--range-min "
        f"{args.range_min}, --range-max {'default' if args.range_max is None else args.range_max})",
    ]
    if any(
        getattr(args, k) is not None
        for k in ("min_score", "max_score", "absolute_margin", "relative_margin")
    ):
        loosen.append("loosen --min-score / --max-score / the margins")
    if args.sampling == "ring":
        loosen.append(
            f"raise --ring-rho-out (now {args.ring_rho_out}): the band keeps only the candidates "
            "ranked between the rho_in and rho_out shares of the window"
        )
    elif args.sampling == "potential":
        loosen.append("lower --potential-a (a narrower kernel keeps fewer candidates)")
    return "warning: no row was written: every query had fewer candidates left; " + "; ".join(
        loosen
    )


class _ModelOnFirstUse:
    """A model loaded on its first call of ``method`` (``encode`` for the sentence model,
    ``predict`` for the cross-encoder): ``mine_hard_negatives`` checks every setting before it
    embeds, so a wrong setting fails before the model loads (seconds for MiniLM, a minute for a
    large model), and a run whose embeddings are all cached (``--cache-dir``) never loads it."""

    def __init__(self, load, method: str = "encode") -> None:
        self._load = load
        self._model = None
        setattr(
            self, method, lambda *args, **kwargs: getattr(self._loaded(), method)(*args, **kwargs)
        )

    def _loaded(self):
        if self._model is None:
            self._model = self._load()
        return self._model
