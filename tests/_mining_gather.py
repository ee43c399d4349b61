"""Worker of the two-process mining test: torch and hardneg.mining only (fast to spawn)."""

from __future__ import annotations

import json
import os
import zlib

import torch

from hardneg.mining import mine_hard_negatives


class FakeModel:
    """A deterministic random vector per text, whatever the batch (as in test_mining)."""

    def encode(self, texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False):
        rows = []
        for t in texts:
            gen = torch.Generator().manual_seed(zlib.crc32(t.encode()))
            rows.append(torch.randn(16, generator=gen))
        return torch.stack(rows)


class FakeReranker:
    """A fixed score per (query, text) pair; counts the pairs it was asked (the work a rank did)."""

    def __init__(self) -> None:
        self.asked = 0

    def predict(self, pairs, batch_size=32, show_progress_bar=False):
        self.asked += len(pairs)
        return [(zlib.crc32(f"{q}|{t}".encode()) % 1000) / 1000 for q, t in pairs]


def data():
    """37 queries; positives 0..29 are in a corpus of 101 texts (with a duplicate), 30..36 not."""
    queries = [f"query {i}" for i in range(37)]
    positives = [f"doc {i}" for i in range(37)]
    corpus = [f"doc {i}" for i in range(30)] + [f"doc {i}" for i in range(40, 110)] + ["doc 3"]
    return queries, positives, corpus


SETTINGS = {
    "top": dict(sampling="top", num_negatives=3, range_min=1, range_max=12),
    "simans": dict(sampling="simans", num_negatives=4, relative_margin=0.05, simans_a=2.0),
    "hcl": dict(sampling="hcl", num_negatives=2, output_format="triplet", absolute_margin=0.01),
    "ring": dict(sampling="ring", num_negatives=2, range_max=40, ring_rho_out=0.6),
    "random": dict(sampling="random", num_negatives=5, min_score=-0.5, max_score=0.9),
    # a reranker (its scores in [0, 1)): each rank scores a share of the queries
    "rerank": dict(sampling="top", num_negatives=3, range_min=1, range_max=10, absolute_margin=0.0),
}


def mine_all() -> dict[str, list]:
    queries, positives, corpus = data()
    out = {}
    reranker = FakeReranker()
    for name, settings in SETTINGS.items():
        kwargs = {"output_format": "n-tuple", "query_chunk_size": 7, "corpus_chunk_size": 11}
        kwargs.update(settings)
        if name == "rerank":
            kwargs["cross_encoder"] = reranker
        out[name] = mine_hard_negatives(
            queries, positives, corpus, model=FakeModel(), seed=3, **kwargs
        )
    out["pairs_asked"] = reranker.asked
    return out


def run_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = mine_all()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()
