"""The text-loss benchmark against ``MultipleNegativesRankingLoss``: it compares the same
computation (infonce is MNRL on the benchmark's embeddings, and a different loss is caught) and
prints one row per cell."""

from __future__ import annotations

import re

import pytest
import torch
from _bench import load_benchmark

pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("text_loss")


@pytest.mark.parametrize("negatives", [0, 2])
def test_infonce_is_mnrl_on_the_benchmark_embeddings(bench, negatives):
    losses, skipped = bench.make_losses(["infonce", "potential"], 20.0)
    assert skipped == ["potential"] and list(losses) == ["mnrl", "infonce"]
    cols = bench.columns(8, negatives, 16, seed=1)
    assert len(cols) == 2 + negatives and all(c.requires_grad for c in cols)
    bench.check_same_computation(losses, cols)  # raises when they differ
    # another scale is another loss: the check must notice
    other, _ = bench.make_losses(["infonce"], 10.0)
    mixed = {"mnrl": losses["mnrl"], "infonce": other["infonce"]}
    with pytest.raises(AssertionError):
        bench.check_same_computation(mixed, cols)


def test_a_step_leaves_fresh_gradients_on_the_embeddings(bench):
    losses, _ = bench.make_losses(["hcl"], 20.0)
    cols = bench.columns(6, 1, 8, seed=0)
    first = bench.step(losses["hcl"], cols)
    grads = [c.grad.clone() for c in cols]
    second = bench.step(losses["hcl"], cols)  # cleared, not accumulated
    assert torch.equal(first, second)
    for c, g in zip(cols, grads):
        torch.testing.assert_close(c.grad, g)


def test_main_prints_one_row_per_cell_and_the_skipped_strategies(bench, capsys):
    args = "--batch-sizes 8 --negatives 0,1 --rounds 1 --warmup 0 --dim 16 --threads 1"
    assert bench.main([*args.split(), "--strategies", "infonce,potential,hcl"]) == 0
    out = capsys.readouterr().out
    assert "| B | k | MNRL (ms) | infonce (x) | hcl (x) |" in out
    for k in (0, 1):
        row = rf"\| 8 \| {k} \| \d+\.\d\d \| \d+\.\d\d \| \d+\.\d\d \|"
        assert len(re.findall(row, out)) == 2  # as measured, then in the table
    assert "skipped (reject the retrieval layout or the partition): potential" in out


def test_the_joint_partition_is_mnrl_s_and_skips_strategies_with_positives_of_their_own(bench):
    four = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
    losses, skipped = bench.make_losses(["infonce", "fnc", "hcl"], 20.0, four, "joint")
    assert skipped == ["fnc"] and list(losses) == ["mnrl", "infonce", "hcl"]
    assert losses["mnrl"].directions == four
    bench.check_same_computation(losses, bench.columns(8, 1, 16, seed=2))
    plain, _ = bench.make_losses(["infonce"], 20.0)
    with pytest.raises(AssertionError):  # the plain layout is another loss
        bench.check_same_computation({"mnrl": losses["mnrl"], "infonce": plain["infonce"]},
                                     bench.columns(8, 1, 16, seed=2))  # fmt: skip
