"""Why hardneg and sentence-transformers mine different row counts on benchmarks/mining.py's data.

Embeds the Lee corpus sentences once (every query and positive is one of them; ``--cache``
keeps the ``.npy``), then runs both ``mine_hard_negatives`` on those embeddings through a
lookup model, on all pairs, on the distinct pairs, and hardneg with ``range_max + 1``
(sentence-transformers' effective window). See docs/text.md, "Why the row counts differ".

    python benchmarks/mining_rows.py --cache /tmp/lee_minilm.npy
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def main() -> None:
    from mining import lee_pairs

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--cache")
    p.add_argument("--range-max", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    queries, positives, corpus = lee_pairs()
    if args.cache and os.path.exists(args.cache):
        emb = np.load(args.cache)
    else:
        from hardneg.text.models import load_sentence_model

        model = load_sentence_model(args.model)
        emb = model.encode(corpus, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
        if args.cache:
            np.save(args.cache, emb)
    table = torch.from_numpy(emb)
    row = {t: i for i, t in enumerate(corpus)}

    class Lookup:  # the two encode APIs on fixed embeddings
        device = torch.device("cpu")

        def encode(self, texts, **kw):
            return table[[row[t] for t in texts]]

        def encode_document(self, texts, **kw):
            return self.encode(texts).numpy()

        encode_query = encode_document

        def similarity(self, a, b):
            return torch.as_tensor(a) @ torch.as_tensor(b).T

        def similarity_pairwise(self, a, b):
            return (torch.as_tensor(a) * torch.as_tensor(b)).sum(-1)

    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives as st_mine

    from hardneg.mining import mine_hard_negatives

    kw = dict(num_negatives=3, relative_margin=0.05, output_format="n-tuple")

    def key(r):
        return tuple(r[c] for c in ("anchor", "positive", "negative_1", "negative_2", "negative_3"))

    distinct = list(dict.fromkeys(zip(queries, positives)))
    for name, pairs in (("all pairs", list(zip(queries, positives))), ("distinct pairs", distinct)):
        qs, ps = [a for a, _ in pairs], [b for _, b in pairs]
        ours = mine_hard_negatives(qs, ps, corpus, model=Lookup(), range_max=args.range_max, **kw)
        theirs = st_mine(
            Dataset.from_dict({"anchor": qs, "positive": ps}),
            Lookup(),
            corpus=corpus,
            range_max=args.range_max,
            verbose=False,
            **kw,
        ).to_list()
        wide = mine_hard_negatives(
            qs, ps, corpus, model=Lookup(), range_max=args.range_max + 1, **kw
        )
        same = set(map(key, wide)) == set(map(key, theirs)) and len(wide) == len(theirs)
        print(
            f"{name} ({len(pairs)}): hardneg {len(ours)}, sentence-transformers {len(theirs)}, "
            f"hardneg with range_max {args.range_max + 1}: {len(wide)} (same rows: {same})"
        )


if __name__ == "__main__":
    main()
