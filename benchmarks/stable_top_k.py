"""Time the chunk merges of ``mining.merge_top_k`` (what ``beir.rank_documents`` runs): each
``query block x (k + chunk)`` merge selected by ``topk`` (``stable=False``), by a full stable
sort (``stable=True`` before 2026-12-03) and by :func:`hardneg.mining.stable_top_k` (now), on
random unit embeddings; the score blocks (matrix products) timed apart. Checks that the stable
selections give the same rows.

    OMP_NUM_THREADS=1 nice -n 19 python3 benchmarks/stable_top_k.py --queries 5000 \\
        --docs 200000 --chunk 50000 --k 100
"""

from __future__ import annotations

import argparse
import time

import torch

from hardneg.mining import stable_top_k


def full_sort(merged: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(merged, dim=1, descending=True, stable=True).indices[:, :k]


def top_k(merged: torch.Tensor, k: int) -> torch.Tensor:
    return merged.topk(k, dim=1).indices


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=50_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--query-chunk", type=int, default=1024)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize
    queries = unit(torch.randn(args.queries, args.dim, generator=gen), dim=1)
    docs = unit(torch.randn(args.docs, args.dim, generator=gen), dim=1)
    pickers = {"topk": top_k, "full stable sort": full_sort, "stable_top_k": stable_top_k}
    seconds = dict.fromkeys(["score blocks", *pickers], 0.0)
    best = {name: torch.full((args.queries, args.k), float("-inf")) for name in pickers}
    rows = {name: torch.full((args.queries, args.k), -1) for name in pickers}
    for c0 in range(0, args.docs, args.chunk):
        chunk = docs[c0 : c0 + args.chunk]
        ids = torch.arange(c0, c0 + chunk.shape[0])
        for q0 in range(0, args.queries, args.query_chunk):
            q1 = min(q0 + args.query_chunk, args.queries)
            t = time.perf_counter()
            scores = queries[q0:q1] @ chunk.T
            seconds["score blocks"] += time.perf_counter() - t
            for name, pick in pickers.items():
                merged = torch.cat([best[name][q0:q1], scores], dim=1)
                merged_rows = torch.cat([rows[name][q0:q1], ids.expand(q1 - q0, -1)], dim=1)
                t = time.perf_counter()
                pos = pick(merged, args.k)
                seconds[name] += time.perf_counter() - t
                best[name][q0:q1] = merged.gather(1, pos)
                rows[name][q0:q1] = merged_rows.gather(1, pos)
    same = torch.equal(rows["full stable sort"], rows["stable_top_k"])
    print(
        f"{args.queries} queries x {args.docs} docs, chunks of {args.chunk}, top {args.k}, "
        f"d {args.dim}, query blocks of {args.query_chunk}, {torch.get_num_threads()} thread(s)"
    )
    for name, s in seconds.items():
        print(f"  {name:<18} {s:8.2f} s")
    print(f"  stable rows equal: {same}")


if __name__ == "__main__":
    main()
