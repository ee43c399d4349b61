"""Worker of the two-process gather test: torch and hardneg only (fast to spawn)."""

from __future__ import annotations

import os

import torch
from torch import nn

from hardneg.integrations.sentence_transformers import (
    CachedHardNegativeLoss,
    HardNegativeLoss,
    text_ids,
)

VOCAB, BATCH, COLUMNS = 40, 8, 4  # anchor, positive, 2 hard negatives
FORMS = (
    ("plain", False, False),
    ("cached", True, False),
    ("guided", True, True),
    ("joint", True, True),  # GTE's four blocks: the documents' sets are gathered too
)


class BagEncoder(nn.Module):
    """Token bag -> linear: returns a sentence-transformers style dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag = nn.EmbeddingBag(VOCAB, 16, mode="mean")
        self.proj = nn.Linear(16, 8)

    def forward(self, features):
        emb = self.proj(torch.tanh(self.bag(features["input_ids"])))
        return {**features, "sentence_embedding": emb}


def batch(rank: int | None = None, world: int = 1):
    """``COLUMNS`` columns of ``BATCH`` token rows; anchors 0 and 5 share a positive."""
    gen = torch.Generator().manual_seed(1)
    cols = [torch.randint(1, VOCAB, (BATCH, 5), generator=gen) for _ in range(COLUMNS)]
    cols[1][5] = cols[1][0]
    feats = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in cols]
    assert text_ids(feats[1])[0] == text_ids(feats[1])[5]
    if rank is None:
        return feats
    half = BATCH // world
    return [{k: v[rank * half : (rank + 1) * half] for k, v in f.items()} for f in feats]


class Guide(BagEncoder):
    """Another encoder of the same tokens (its own weights): a guide model for ``guide=``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.bag = nn.EmbeddingBag(VOCAB, 16, mode="mean")
        self.proj = nn.Linear(16, 8)


def make_loss(
    model: nn.Module, cached: bool = False, guide: bool = False, joint: bool = False
) -> HardNegativeLoss:
    """The loss of the gather tests; ``cached``: the GradCache form in mini-batches of 3 rows
    (each process holds 4 rows: a full and a short mini-batch); ``guide``: with a guide model's
    false negatives (gathered too)."""
    kwargs = {"gather_across_devices": True, "symmetric": True, "beta": 1.0}
    if joint:
        del kwargs["symmetric"]
        kwargs["directions"] = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
    if guide:
        kwargs.update(guide=Guide(), guide_margin=0.02)
    if cached:
        return CachedHardNegativeLoss(model, "hcl", mini_batch_size=3, **kwargs)
    return HardNegativeLoss(model, "hcl", **kwargs)


def run_rank(rank: int, world: int, port: int, out) -> None:
    """Loss value and DDP-averaged gradients of the plain and of the cached form on this
    process's half of the batch (rank 0 saves them)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name, cached, guide in FORMS:
            model = BagEncoder()
            value = make_loss(model, cached, guide, name == "joint")(batch(rank, world), None)
            value.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            for g in grads.values():  # what DDP does: average the ranks' gradients
                torch.distributed.all_reduce(g)
                g /= world
            results[name] = {"value": value.detach(), "grads": grads}
        if rank == 0:
            torch.save(results, out)
    finally:
        torch.distributed.destroy_process_group()
