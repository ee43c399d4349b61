"""Offline mining: hardneg.mining.mine_hard_negatives vs sentence_transformers.util.mine_hard_negatives.

Same model, same pairs, same corpus, same settings (top sampling, range_max, num_negatives, a
relative margin), each tool in a fresh subprocess (so peak RSS is its own), interleaved rounds in
one run. Data: gensim's Lee background corpus (shipped in gensim's wheel), split into sentences;
the queries are sentences, their positives the next sentence of the same document, the corpus
every sentence (``--copies N`` appends N numbered copies to grow the corpus).

    python benchmarks/mining.py --rounds 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time


def lee_pairs(copies: int = 0):
    from gensim.test.utils import datapath

    docs = open(datapath("lee_background.cor"), encoding="latin-1").read().splitlines()
    queries, positives, corpus = [], [], []
    for doc in docs:
        sents = [s for s in re.split(r"(?<=[.!?])\s+", doc.strip()) if len(s.split()) > 3]
        corpus.extend(sents)
        for a, b in zip(sents, sents[1:]):
            queries.append(a)
            positives.append(b)
    corpus = list(dict.fromkeys(corpus))
    base = list(corpus)
    for c in range(copies):
        corpus.extend(f"{s} ({c + 1})" for s in base)
    return queries, positives, corpus


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(tool: str, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from hardneg.text.models import load_sentence_model

    queries, positives, corpus = lee_pairs(args.copies)
    model = load_sentence_model(args.model)
    model.encode(["warm up"])
    base = rss_mb()
    t = time.perf_counter()
    if tool == "hardneg":
        from hardneg.mining import mine_hard_negatives

        rows = mine_hard_negatives(
            queries,
            positives,
            corpus,
            model=model,
            num_negatives=args.num_negatives,
            range_max=args.range_max,
            relative_margin=args.relative_margin,
            batch_size=args.batch_size,
            output_format="n-tuple",
        )
        n = len(rows)
    else:
        from datasets import Dataset
        from sentence_transformers.util import mine_hard_negatives

        ds = Dataset.from_dict({"anchor": queries, "positive": positives})
        out = mine_hard_negatives(
            ds,
            model,
            corpus=corpus,
            num_negatives=args.num_negatives,
            range_max=args.range_max,
            relative_margin=args.relative_margin,
            batch_size=args.batch_size,
            output_format="n-tuple",
            verbose=False,
        )
        n = len(out)
    seconds = time.perf_counter() - t
    print(
        json.dumps(
            {
                "tool": tool,
                "seconds": seconds,
                "peak_mb": rss_mb(),
                "base_mb": base,
                "rows": n,
                "queries": len(queries),
                "corpus": len(corpus),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--copies", type=int, default=0)
    p.add_argument("--num-negatives", type=int, default=3)
    p.add_argument("--range-max", type=int, default=30)
    p.add_argument("--relative-margin", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        child(args.child, args)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = []
    for r in range(args.rounds):
        for tool in ("hardneg", "sentence-transformers"):
            out = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--child", tool],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["round"] = r
            results.append(res)
            print(json.dumps(res), flush=True)
    print(
        f"\n{results[0]['queries']} queries, corpus {results[0]['corpus']}, model {args.model}, "
        f"{args.threads} threads, num_negatives {args.num_negatives}, range_max {args.range_max}, "
        f"relative_margin {args.relative_margin}\n"
    )
    print("| tool | round | seconds | peak RSS (MB) | RSS growth while mining (MB) | rows |")
    print("|---|---|---|---|---|---|")
    for res in results:
        print(
            f"| {res['tool']} | {res['round']} | {res['seconds']:.1f} | {res['peak_mb']:.0f} | "
            f"{res['peak_mb'] - res['base_mb']:.0f} | {res['rows']} |"
        )


if __name__ == "__main__":
    main()
