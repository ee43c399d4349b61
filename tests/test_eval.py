"""Weighted kNN, linear probe and feature extraction against answers computed by hand."""

from __future__ import annotations

import math
import re

import pytest
import torch
from _same import assert_same
from torch import nn

from hardneg.data import ArrayDataset
from hardneg.evaluation import extract_features, knn_scores, linear_probe, weighted_knn


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small tensors gain nothing from a second intra-op thread, and on shared CI cores the
    spinning OpenMP workers made these tests 5x slower (145 s vs 27 s measured on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# four train points on the unit circle (class 0 at 0 deg, class 1 at 30 and 90 deg, class 2 at
# 180 deg) and a test point at 10 deg: cosines 0.985 (c0), 0.940 and 0.174 (c1), -0.985 (c2)
TRAIN_F = torch.tensor([unit(0), unit(30), unit(90), unit(180)])
TRAIN_Y = torch.tensor([0, 1, 1, 2])
TEST_F = torch.tensor([unit(10)])


def test_knn_scores_are_sums_of_exp_similarity_over_temperature():
    s = [math.cos(math.radians(a)) for a in (10, 20, 80)]  # the three nearest, in order
    scores = knn_scores(TRAIN_F, TRAIN_Y, TEST_F, k=3, temperature=0.5, num_classes=3)
    expected = torch.tensor(
        [[math.exp(s[0] / 0.5), math.exp(s[1] / 0.5) + math.exp(s[2] / 0.5), 0.0]]
    )
    # scores are computed up to the row factor exp(-max s / t), which keeps them finite
    torch.testing.assert_close(scores * math.exp(s[0] / 0.5), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("k", "temperature", "predicted"),
    [
        (1, 0.1, 0),  # nearest neighbour: class 0
        (3, 0.1, 0),  # e^9.85 > e^9.40 + e^1.74: the sharp weights keep class 0
        (3, 1.0, 1),  # e^0.985 = 2.68 < e^0.940 + e^0.174 = 3.75: two class-1 votes win
        (3, 1e4, 1),  # t -> inf: plain majority vote
        (4, 1e4, 1),  # the class-2 point adds a vote to class 2 only
    ],
)
def test_knn_prediction_matches_the_hand_computed_vote(k, temperature, predicted):
    for label in range(3):
        result = weighted_knn(TRAIN_F, TRAIN_Y, TEST_F, torch.tensor([label]), k, temperature)
        assert result["top1"] == (100.0 if label == predicted else 0.0)


def test_knn_top5_with_fewer_than_five_classes_is_100_and_k_is_clipped():
    result = weighted_knn(TRAIN_F, TRAIN_Y, TEST_F, torch.tensor([2]), k=200, temperature=0.1)
    assert result == {"top1": 0.0, "top5": 100.0}


def test_knn_accuracy_counts_over_several_test_points():
    test_f = torch.tensor([unit(10), unit(85), unit(170), unit(-5)])
    result = weighted_knn(TRAIN_F, TRAIN_Y, test_f, torch.tensor([0, 1, 2, 1]), k=1)
    assert result["top1"] == 75.0  # the last point's nearest neighbour is class 0


def test_knn_uses_cosine_so_feature_scale_does_not_matter():
    scaled = TRAIN_F * torch.tensor([[1.0], [7.0], [0.01], [3.0]])
    a = knn_scores(TRAIN_F, TRAIN_Y, TEST_F * 5, k=3, temperature=0.2)
    b = knn_scores(scaled, TRAIN_Y, TEST_F, k=3, temperature=0.2)
    torch.testing.assert_close(a, b)


def test_knn_chunking_does_not_change_the_scores():
    gen = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(300, 16, generator=gen), torch.randn(70, 16, generator=gen)
    train_y = torch.randint(0, 7, (300,), generator=gen)
    full = knn_scores(train_f, train_y, test_f, k=20, temperature=0.1, chunk_size=1000)
    chunked = knn_scores(train_f, train_y, test_f, k=20, temperature=0.1, chunk_size=9)
    torch.testing.assert_close(full, chunked)


def test_knn_matches_the_one_hot_reference_implementation():
    # the formulation of the instance-discrimination / HCL code: one-hot labels times weights
    gen = torch.Generator().manual_seed(1)
    train_f = nn.functional.normalize(torch.randn(500, 32, generator=gen), dim=1)
    test_f = nn.functional.normalize(torch.randn(100, 32, generator=gen), dim=1)
    train_y = torch.randint(0, 10, (500,), generator=gen)
    test_y = torch.randint(0, 10, (100,), generator=gen)
    sim = test_f @ train_f.T
    w, idx = sim.topk(50, dim=1)
    one_hot = torch.zeros(100, 50, 10).scatter_(2, train_y[idx].unsqueeze(2), 1.0)
    ref = (one_hot * (w / 0.1).exp().unsqueeze(2)).sum(1)
    ours = knn_scores(train_f, train_y, test_f, k=50, temperature=0.1, num_classes=10)
    assert torch.equal(ours.argmax(1), ref.argmax(1))
    expected_top1 = 100.0 * (ref.argmax(1) == test_y).sum().item() / 100
    assert weighted_knn(train_f, train_y, test_f, test_y, k=50)["top1"] == expected_top1


def test_knn_stays_finite_at_a_tiny_temperature():
    scores = knn_scores(TRAIN_F, TRAIN_Y, TEST_F, k=3, temperature=1e-4)
    assert torch.isfinite(scores).all() and scores.argmax().item() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be"),
        ({"temperature": 0.0}, "temperature"),
        ({"train_labels": torch.tensor([0, 1, -1, 2])}, "labels must be >= 0"),
        ({"test_features": torch.ones(1, 3)}, "feature dims differ"),
        ({"train_labels": torch.tensor([0, 1])}, "rows"),
    ],
)
def test_knn_rejects_bad_inputs_with_a_clear_message(kwargs, message):
    args = {"train_features": TRAIN_F, "train_labels": TRAIN_Y, "test_features": TEST_F,
            "test_labels": torch.tensor([0])}  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        weighted_knn(**args)


def knn_vote_float64(train_f, train_y, test_f, k, temperature, num_classes):
    """The weighted vote restated one test row at a time in float64: sort the cosines, keep the
    k largest, add exp(s / t) to each neighbour's class."""
    train = train_f.double() / train_f.double().norm(dim=1, keepdim=True)
    scores = torch.zeros(test_f.shape[0], num_classes, dtype=torch.float64)
    for i, row in enumerate(test_f.double()):
        sims = train @ (row / row.norm())
        for j in sims.argsort(descending=True)[:k].tolist():
            scores[i, int(train_y[j])] += math.exp(float(sims[j]) / temperature)
    return scores


def test_weighted_knn_votes_with_200_neighbours_and_t_0_1_by_default():
    # 100 class-0 points at 1 deg, 100 class-1 points at 1.5 deg, 60 class-1 points at 2 deg from
    # the test point: the 200 nearest give class 0 a 0.2 % lead at t = 0.1, a 201st neighbour
    # (a class-1 point at 2 deg) gives the vote to class 1
    train_f = torch.tensor([unit(1.0)] * 100 + [unit(1.5)] * 100 + [unit(2.0)] * 60)
    train_y = torch.tensor([0] * 100 + [1] * 160)
    test_f, test_y = torch.tensor([unit(0.0)]), torch.tensor([0])
    for k, winner in ((200, 0), (201, 1)):
        assert int(knn_vote_float64(train_f, train_y, test_f, k, 0.1, 2).argmax()) == winner
    assert weighted_knn(train_f, train_y, test_f, test_y) == {"top1": 100.0, "top5": 100.0}


def test_weighted_knn_counts_a_class_seen_only_in_the_test_labels():
    # num_classes defaults to the largest label of either split: with 3 classes every label is
    # within the top 5, class 2 included, though no train point votes for it
    train_y = torch.tensor([0, 1, 1, 0])
    for chunk_size in (1, 1024):
        result = weighted_knn(
            TRAIN_F, train_y, TEST_F, torch.tensor([2]), k=3, chunk_size=chunk_size
        )
        assert result == {"top1": 0.0, "top5": 100.0}


def test_knn_with_a_single_train_point_and_chunks_of_one_row():
    test_f = torch.tensor([unit(10), unit(170), unit(-5)])
    expected = knn_vote_float64(TRAIN_F, TRAIN_Y, test_f, 3, 0.5, 3)
    scores = knn_scores(TRAIN_F, TRAIN_Y, test_f, k=3, temperature=0.5, chunk_size=1)
    # the scores carry the row factor exp(-max s / t): compare each row normalised to sum 1
    torch.testing.assert_close(
        scores.double() / scores.double().sum(1, keepdim=True),
        expected / expected.sum(1, keepdim=True),
    )
    alone = weighted_knn(TRAIN_F[:1], TRAIN_Y[:1], test_f, torch.tensor([0, 0, 0]), k=5)
    assert alone == {"top1": 100.0, "top5": 100.0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"test_labels": torch.tensor([0, 1, 2])},
            "test_features has 1 rows but test_labels has 3",
        ),
        (
            {"train_labels": torch.tensor([0, 1])},
            "train_features has 4 rows but train_labels has 2",
        ),
        (
            {"train_features": TRAIN_F[:, :, None]},
            "features must be 2-D [rows, dim], got (4, 2, 1) and (1, 2)",
        ),
        (
            {"test_features": TEST_F[:, :, None]},
            "features must be 2-D [rows, dim], got (4, 2) and (1, 2, 1)",
        ),
        (
            {"train_features": TRAIN_F[:0], "train_labels": TRAIN_Y[:0], "num_classes": 3},
            "the train set is empty",
        ),
        (
            {"train_labels": torch.tensor([0, 1, -1, 2])},
            "train labels must be >= 0 (drop unlabelled examples before the kNN)",
        ),
        ({"chunk_size": 0}, "chunk_size must be >= 1, got 0"),
    ],
)
def test_knn_refusals_carry_their_exact_message(kwargs, message):
    args = {"train_features": TRAIN_F, "train_labels": TRAIN_Y, "test_features": TEST_F,
            "test_labels": torch.tensor([0])}  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        weighted_knn(**args)


def blobs(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated Gaussian blobs: linearly separable with a wide margin."""
    gen = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(classes, dim, generator=gen)
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dim, generator=gen), y


def test_linear_probe_reaches_100_percent_on_linearly_separable_data():
    x, y = blobs(600, 20, 6, seed=0)
    result = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert result["top1"] == 100.0 and result["top5"] == 100.0 and result["train_top1"] == 100.0


def test_linear_probe_with_adam_also_separates_the_blobs():
    x, y = blobs(300, 10, 3, seed=1)
    assert (
        linear_probe(x[:200], y[:200], x[200:], y[200:], optimizer="adam", lr=0.1, max_iter=200)[
            "top1"
        ]
        == 100.0
    )


def test_linear_probe_separates_labels_from_a_random_hyperplane():
    # labels from a random hyperplane; train and test from the same rule
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(800, 8, generator=gen)
    w = torch.randn(8, generator=gen)
    margin = x @ w
    keep = margin.abs() > 0.3  # a margin, so that the problem is strictly separable
    x, y = x[keep], (margin[keep] > 0).long()
    result = linear_probe(x[:400], y[:400], x[400:], y[400:], weight_decay=0.0)
    assert result["top1"] == 100.0


def test_linear_probe_is_deterministic_and_invariant_to_feature_scale():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(400, 16, generator=gen)
    y = (x[:, :4].sum(1) + 0.8 * torch.randn(400, generator=gen) > 0).long()
    a = linear_probe(x[:300], y[:300], x[300:], y[300:], seed=5)
    b = linear_probe(x[:300], y[:300], x[300:], y[300:], seed=5)
    assert a == b
    # standardisation with the train statistics removes any per-dimension affine map
    scale = torch.rand(16, generator=gen) * 100 + 0.1
    c = linear_probe(x[:300] * scale + 3, y[:300], x[300:] * scale + 3, y[300:], seed=5)
    assert abs(c["top1"] - a["top1"]) <= 1.0


def probe_optimum_float64(x, y, num_classes, weight_decay, steps=4000):
    """The probe's problem restated and solved apart: standardise with the train mean and
    population std, then minimise mean cross-entropy + (weight_decay / 2) ||W||^2 (the bias
    free) by full-batch Newton-free gradient descent in float64 from zero."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    z = (x - mean) / std
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(z @ w.T + b, y) + 0.5 * weight_decay * (w * w).sum()
        gw, gb = torch.autograd.grad(loss, (w, b))
        with torch.no_grad():
            w -= 0.5 * gw
            b -= 0.5 * gb
    return lambda t: ((t.double() - mean) / std) @ w.detach().T + b.detach()


def imbalanced_overlapping(seed: int):
    """Two classes, 85 / 15, overlapping on feature 0 (scale 0.3); feature 1 is noise at scale
    10: the bias, the weight decay and the per-feature scaling all move the boundary."""
    gen = torch.Generator().manual_seed(seed)
    y = (torch.arange(100) >= 85).long()
    x0 = 0.3 * (torch.randn(100, generator=gen) + 1.5 * y)
    x1 = 10 * torch.randn(100, generator=gen)
    return torch.stack([x0, x1], dim=1).double(), y


@pytest.mark.parametrize("weight_decay", [None, 0.1])
def test_linear_probe_predicts_as_the_optimum_of_its_objective(weight_decay):
    x, y = imbalanced_overlapping(5)
    decay = 1e-3 if weight_decay is None else weight_decay  # the documented default
    scores = probe_optimum_float64(x, y, 2, decay)
    gen = torch.Generator().manual_seed(6)
    test = torch.stack(
        [0.3 * 10 * (torch.rand(4000, generator=gen) - 0.3), 10 * torch.randn(4000, generator=gen)],
        1,
    )
    s = scores(test)
    clear = (s[:, 1] - s[:, 0]).abs() > 0.05  # away from the boundary: no rounding decides
    test_y = s.argmax(1)[clear]
    assert 0 < int(test_y.sum()) < int(clear.sum())  # both classes predicted: not vacuous
    kwargs = {} if weight_decay is None else {"weight_decay": weight_decay}
    # float64 features: the probe trains in float32 whatever it is given
    result = linear_probe(x, y, test[clear].double(), test_y, **kwargs)
    assert result["top1"] == 100.0
    train_pred = scores(x).argmax(1)
    assert result["train_top1"] == pytest.approx(100.0 * float((train_pred == y).double().mean()))


def test_linear_probe_lbfgs_honours_max_iter_and_tol():
    x, y = imbalanced_overlapping(5)
    # 12 iterations to converge on these 80 rows with the defaults (measured)
    assert linear_probe(x[:80], y[:80], x[80:], y[80:])["iterations"] > 3
    assert linear_probe(x[:80], y[:80], x[80:], y[80:], max_iter=3)["iterations"] == 3.0
    # a gradient already below tol at the start: no iteration
    assert linear_probe(x[:80], y[:80], x[80:], y[80:], tol=10.0)["iterations"] == 0.0


def test_linear_probe_with_adam_counts_its_steps_and_stops_on_a_multiple_of_10():
    x, y = blobs(60, 4, 3, seed=4)
    five = linear_probe(x[:40], y[:40], x[40:], y[40:], optimizer="adam", max_iter=5, tol=0.0)
    assert five["iterations"] == 5.0
    none = linear_probe(x[:40], y[:40], x[40:], y[40:], optimizer="adam", max_iter=0)
    assert none["iterations"] == 0.0
    # the default lr (0.01) with tol = 1e-2: the relative change over 10 steps falls below it
    # before 1000 steps on blobs (550 measured); the check runs every 10 steps
    done = linear_probe(x[:40], y[:40], x[40:], y[40:], optimizer="adam", tol=1e-2)
    assert 10 <= done["iterations"] < 1000 and done["iterations"] % 10 == 0
    assert done["top1"] == 100.0 and done["train_top1"] == 100.0


def test_linear_probe_standardises_with_the_population_std():
    # Four train points, one of class 1, under a strong decay: the boundary sits where the decay
    # puts it. Dividing by the N - 1 std instead shrinks every standardised feature by
    # sqrt(3 / 4), the same as a decay 4 / 3 larger, and moves the boundary from 4.13 to 4.72
    # (the float64 optimum of each): the test point at 4.4 lies between them.
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1])
    test = torch.tensor([[3.8], [4.4], [5.2]], dtype=torch.float64)
    expected = probe_optimum_float64(x, y, 2, 1.0)(test).argmax(1)
    assert expected.tolist() == [0, 1, 1]
    # the N - 1 std, restated as the larger decay: the middle point changes class
    assert probe_optimum_float64(x, y, 2, 4 / 3)(test).argmax(1).tolist() == [0, 0, 1]
    result = linear_probe(x, y, test, expected, weight_decay=1.0, tol=1e-6)
    assert result["top1"] == 100.0 and result["train_top1"] == 75.0


def adam_bias_losses(freq: list[float], lr: float, steps: int) -> list[float]:
    """The loss before each of ``steps`` full-batch Adam steps (torch's defaults: betas 0.9 and
    0.999, eps 1e-8, bias-corrected moments) of a softmax classifier that learns only its bias,
    from zero, on labels of class frequencies ``freq``: float64, one class at a time."""
    b, m, v, losses = [0.0] * len(freq), [0.0] * len(freq), [0.0] * len(freq), []
    for t in range(1, steps + 1):
        z = sum(math.exp(bc) for bc in b)
        p = [math.exp(bc) / z for bc in b]
        losses.append(-sum(f * math.log(pc) for f, pc in zip(freq, p)))
        for c, (pc, f) in enumerate(zip(p, freq)):
            g = pc - f
            m[c] = 0.9 * m[c] + 0.1 * g
            v[c] = 0.999 * v[c] + 0.001 * g * g
            step = (m[c] / (1 - 0.9**t)) / (math.sqrt(v[c] / (1 - 0.999**t)) + 1e-8)
            b[c] -= lr * step
    return losses


@pytest.mark.parametrize(
    ("lr", "tol", "max_iter"),
    [
        (None, 0.045, 60),  # the default lr 0.01: 30 steps (20 with a tol not relative)
        (0.1, 0.01, 60),  # 30 steps at the lr given (60 at the default)
        (None, 0.05, 60),  # 30 steps (20 at lr 1.01)
        (None, 1.0, 60),  # any change is small enough: the first comparison, at step 20
        (None, 0.0, 1),  # one step (the step count starts at 1)
        (None, 0.0, 25),  # never stops: every step taken
    ],
)
def test_linear_probe_with_adam_stops_where_the_relative_loss_change_falls_below_tol(
    lr, tol, max_iter
):
    # Constant features standardise to 0 and weight_decay=0 leaves the (random) weights without
    # any gradient: the probe learns only its bias, so its loss after each Adam step is
    # adam_bias_losses', whatever its initialisation. The loss is checked every 10 steps and
    # compared with the loss 10 steps earlier (none at step 10): it stops at the first check
    # where |loss_{k-10} - loss_k| <= tol * |loss_k|.
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    losses = adam_bias_losses([0.75, 0.25], 0.01 if lr is None else lr, max_iter)
    expected = max_iter
    for k in range(20, max_iter + 1, 10):
        ratio = abs(losses[k - 11] - losses[k - 1]) / losses[k - 1]
        assert not 0.9 * tol < ratio < 1.1 * tol  # far from tol: float32 cannot decide
        if ratio <= tol:
            expected = k
            break
    x = torch.ones(8, 3)
    result = linear_probe(
        x, y, x, y, optimizer="adam", lr=lr, tol=tol, max_iter=max_iter, weight_decay=0.0
    )
    assert result["iterations"] == float(expected)
    assert result["top1"] == result["train_top1"] == 75.0  # the majority class everywhere


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"train_f": torch.ones(6, 2, 1)},
            "features must be [rows, dim] with equal dims, got (6, 2, 1) and (4, 2)",
        ),
        (
            {"test_f": torch.ones(4, 2, 1)},
            "features must be [rows, dim] with equal dims, got (6, 2) and (4, 2, 1)",
        ),
        (
            {"test_f": torch.ones(4, 3)},
            "features must be [rows, dim] with equal dims, got (6, 2) and (4, 3)",
        ),
        (
            {"test_y": torch.zeros(3, dtype=torch.long)},
            "features and labels must have the same number of rows",
        ),
        (
            {"train_y": torch.zeros(5, dtype=torch.long)},
            "features and labels must have the same number of rows",
        ),
        (
            {"train_y": torch.tensor([0, 1, -1, 0, 1, 0])},
            "train labels must be >= 0 (drop unlabelled examples before the probe)",
        ),
        ({"optimizer": "sgd"}, "optimizer must be 'lbfgs' or 'adam', got 'sgd'"),
    ],
)
def test_linear_probe_refusals_carry_their_exact_message(kwargs, message):
    args = {"train_f": torch.randn(6, 2), "train_y": torch.tensor([0, 1, 0, 1, 0, 1]),
            "test_f": torch.randn(4, 2), "test_y": torch.tensor([0, 1, 0, 1])}  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        linear_probe(**args)


class Noisy(nn.Module):
    """Dropout + batch norm: outputs differ between train and eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
        self.out_dim = 8

    def forward(self, x):
        return self.net(x.flatten(1))


def test_extract_features_runs_in_eval_mode_without_grad_and_restores_the_mode():
    torch.manual_seed(0)
    model = Noisy().train()
    data = ArrayDataset(inputs=torch.randn(50, 1, 6), labels=torch.arange(50) % 3,
                        num_classes=3, kind="signal", name="toy")  # fmt: skip
    feats, labels = extract_features(model, data, transform=None, batch_size=7)
    assert model.training  # mode restored
    assert feats.shape == (50, 8) and feats.dtype == torch.float32 and not feats.requires_grad
    assert_same(labels, data.labels)
    with torch.no_grad():
        expected = model.eval()(data.inputs)
    torch.testing.assert_close(feats, expected)  # eval mode: deterministic, running stats
    again, _ = extract_features(model, data, transform=nn.Identity(), batch_size=50)
    torch.testing.assert_close(again, expected)
