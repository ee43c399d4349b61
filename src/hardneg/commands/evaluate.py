"""``hardneg eval CHECKPOINT``: weighted kNN and linear-probe accuracy of a trained backbone.

Features are extracted once from the frozen backbone on the evaluation splits of the data set
(``hardneg.data.dataset_info(name).eval_train_split / eval_test_split``); the kNN is the weighted
vote of Wu et al. 2018 and the linear probe a softmax classifier trained to convergence.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="a training checkpoint, e.g. RUN/checkpoints/final.pt, or a run folder RUN (its "
        "checkpoints/final.pt)",
    )
    parser.add_argument("--dataset", help="evaluate on this data set (default: the training one)")
    parser.add_argument(
        "--data-dir",
        help="where the data set lives (default: the run's data.data_dir for the data set it was "
        "trained on; for another --dataset, $HARDNEG_DATA_DIR or ~/.cache/hardneg/data)",
    )
    parser.add_argument("--download", action="store_true", help="download the data if missing")
    parser.add_argument(
        "--image-size",
        type=int,
        help="side the images are evaluated at (default: the run's data.image_size; needed for "
        "an imagefolder of mixed sizes when the run was trained on another data set)",
    )
    parser.add_argument(
        "--knn-k",
        type=int,
        help="kNN neighbours (default: the run's eval.knn_k, as its training monitor; 200)",
    )
    parser.add_argument(
        "--knn-t",
        type=float,
        help="kNN temperature of exp(s/t) (default: the run's eval.knn_temperature; 0.1)",
    )
    parser.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    parser.add_argument("--batch-size", type=int, default=512, help="feature-extraction batch")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the linear probe")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument(
        "--tsne-points", type=int, default=1000, help="t-SNE subsample of --report (0 = none)"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="also write metrics.json and report.md (with plots) into the checkpoint's run folder",
    )
    text = parser.add_argument_group(
        "text (--modality text: CHECKPOINT is a sentence model's name or folder, e.g. "
        "RUN/model of hardneg train --modality text)"
    )
    text.add_argument(
        "--modality",
        choices=("text",),
        help="text: retrieval scores of a sentence model on --data rows",
    )
    text.add_argument(
        "--data",
        help="(anchor, positive[, negatives]) rows, .jsonl / .parquet / .csv: each distinct "
        "anchor queries every positive and negative, its rows' positives being relevant; or a "
        "BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv): each query of --split "
        "ranks the whole corpus (nDCG@k, MRR@k, Recall@k, P@k, MAP@k at 1, 10, 100)",
    )
    text.add_argument("--split", help="the qrels split of a BEIR folder (default: test)")
    text.add_argument("--columns", help="anchor,positive[,negative_1,...] (default: all)")
    text.add_argument("--query-prompt", help="text put before each anchor ('query: ')")
    text.add_argument("--document-prompt", help="text put before each document ('passage: ')")


def run(args: argparse.Namespace) -> int:
    if args.modality == "text":
        return run_text(args)
    for flag in ("data", "columns", "query_prompt", "document_prompt", "split"):
        if getattr(args, flag) is not None:
            raise ValueError(
                f"--{flag.replace('_', '-')} belongs to --modality text (a sentence model "
                "scored on text rows)"
            )
    from hardneg.evaluation import evaluate_checkpoint

    checkpoint = Path(args.checkpoint)
    if checkpoint.is_dir():  # a run folder, as `hardneg train --resume RUN` takes: its final.pt
        final = checkpoint / "checkpoints" / "final.pt"
        if not final.is_file():
            raise FileNotFoundError(
                f"{checkpoint} is a folder without checkpoints/final.pt (a run that has not "
                "finished?); give a checkpoint file, e.g. RUN/checkpoints/last.pt"
            )
        checkpoint = final
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    # named by their flags, before the data load ("temperature must be > 0" read like the loss's)
    for flag, value, low, open_low in (
        ("--knn-k", args.knn_k, 1, False),
        ("--knn-t", args.knn_t, 0, True),
        ("--batch-size", args.batch_size, 1, False),
        ("--tsne-points", args.tsne_points, 0, False),
    ):
        if value is not None and (value < low or (open_low and value == low)):
            raise ValueError(f"{flag} must be {'>' if open_low else '>='} {low}, got {value:g}")
    if args.device != "auto":  # before the data load; torch's message came as a stack trace
        from hardneg.train.runtime import check_device_option

        check_device_option(args.device)
    result = evaluate_checkpoint(
        checkpoint,
        dataset=args.dataset,
        data_dir=args.data_dir,
        image_size=args.image_size,
        knn_k=args.knn_k,
        knn_t=args.knn_t,
        linear=not args.no_linear,
        batch_size=args.batch_size,
        device=args.device,
        download=args.download,
        seed=args.seed,
        return_features=args.report and args.tsne_points > 0,
    )
    features = (result.pop("test_features", None), result.pop("test_labels", None))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_result(result))
    if args.report:
        from hardneg.report import save_metrics, write_run_report

        run_dir = run_dir_of(checkpoint)
        save_metrics(run_dir, result)
        embeddings = None if features[0] is None else (features[0].numpy(), features[1].numpy())
        report = write_run_report(
            run_dir, result, embeddings=embeddings, tsne_points=args.tsne_points
        )
        print(f"report: {report}")
    return 0


def format_result(result: dict) -> str:
    lines = [
        f"checkpoint: {result['checkpoint']}",
        f"data: {result['dataset']} (train on '{result['train_split']}', {result['train_size']} "
        f"examples; test on '{result['test_split']}', {result['test_size']}; "
        f"{result['feature_dim']}-d features)",
        f"kNN (k={result['knn_k']}, t={result['knn_t']:g}):  "
        f"top-1 {result['knn_top1']:6.2f}%   top-5 {result['knn_top5']:6.2f}%",
    ]
    if "linear_top1" in result:
        lines.append(
            f"linear probe:         top-1 {result['linear_top1']:6.2f}%   "
            f"top-5 {result['linear_top5']:6.2f}%"
        )
    return "\n".join(lines)


def run_dir_of(checkpoint: Path) -> Path:
    """``RUN/checkpoints/x.pt`` -> ``RUN``; a checkpoint elsewhere -> its own folder."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def run_text(args: argparse.Namespace) -> int:
    """``hardneg eval --modality text MODEL --data rows``: MRR@10, NDCG@10, R@1, Recall@10."""
    if not args.data:
        raise ValueError("--modality text needs --data rows (anchor, positive[, negatives])")
    from hardneg.text.models import check_model_name, load_sentence_model
    from hardneg.text.train import dev_retrieval, load_columns, sentence_encoder

    check_model_name(args.checkpoint)
    from hardneg.text.beir import is_beir_folder

    if is_beir_folder(args.data):
        return _run_beir(args)
    if args.split is not None:
        raise ValueError(
            f"--split names a qrels split of a BEIR folder; {args.data} is a file of rows"
        )
    names, columns = load_columns(args.data, args.columns)
    device = None if args.device == "auto" else args.device
    model = load_sentence_model(args.checkpoint, device=device)
    import numpy as np

    rows = np.arange(len(columns[0]))
    prompts = (args.query_prompt, args.document_prompt)
    result = dev_retrieval(sentence_encoder(model, args.batch_size), columns, rows, prompts)
    result = {"model": args.checkpoint, "rows": int(rows.size), "columns": names, **result}
    return _print_scores(
        args,
        result,
        f"{args.checkpoint} on {args.data} ({rows.size} rows): MRR@10 {result['mrr']:.4f}, "
        f"NDCG@10 {result['ndcg_10']:.4f}, R@1 {result['recall_1']:.2f}%, "
        f"Recall@10 {result['recall_10']:.2f}%",
    )


def _print_scores(args: argparse.Namespace, result: dict, line: str) -> int:
    """Print a text evaluation: ``result`` as JSON with ``--json``, else the one ``line``."""
    print(json.dumps(result, indent=2) if args.json else line)
    return 0


def _run_beir(args: argparse.Namespace) -> int:
    """``hardneg eval --modality text MODEL --data BEIR_FOLDER [--split test]``."""
    from hardneg.text.beir import evaluate_beir, load_beir
    from hardneg.text.models import load_sentence_model
    from hardneg.text.train import sentence_encoder

    if args.columns is not None:
        raise ValueError("--columns is for a file of rows; a BEIR folder has queries and a corpus")
    split = args.split or "test"
    data = load_beir(args.data, split)  # before the model: a wrong split fails at once
    device = None if args.device == "auto" else args.device
    model = load_sentence_model(args.checkpoint, device=device)
    prompts = (args.query_prompt, args.document_prompt)
    scores = evaluate_beir(sentence_encoder(model, args.batch_size), data, prompts=prompts)
    result = {"model": args.checkpoint, "data": str(args.data), "split": split, **scores}
    return _print_scores(
        args,
        result,
        f"{args.checkpoint} on {args.data} ({split}: {scores['queries']} queries, "
        f"{scores['documents']} documents): nDCG@10 {scores['ndcg@10']:.4f}, "
        f"MRR@10 {scores['mrr@10']:.4f}, Recall@100 {scores['recall@100']:.4f}, "
        f"MAP@100 {scores['map@100']:.4f}",
    )
