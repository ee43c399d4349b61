"""Bad inputs and bad hyper-parameters fail early with a ValueError that names the parameter, the
value it got and what is allowed."""

from __future__ import annotations

import math
import re

import pytest
import torch

import hardneg

LOSSES = hardneg.list_losses()


def z(n=4, d=8, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def raises(message: str):
    """pytest.raises(ValueError) whose message contains ``message`` literally."""
    return pytest.raises(ValueError, match=re.escape(message))


# ------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("name", LOSSES)
def test_views_of_different_shapes_are_rejected(name):
    with raises("z1 and z2 must have the same shape, got (4, 8) and (5, 8)"):
        hardneg.create_loss(name)(z(4), z(5))
    with raises("z1 and z2 must have the same shape, got (4, 8) and (4, 6)"):
        hardneg.create_loss(name)(z(4), z(4, 6))


@pytest.mark.parametrize("name", LOSSES)
def test_queries_and_keys_of_different_shapes_are_rejected_with_a_pool(name):
    with raises("q and k must have the same shape, got (4, 8) and (3, 8)"):
        hardneg.create_loss(name)(z(4), z(3), negatives=z(10))


@pytest.mark.parametrize("name", LOSSES)
def test_a_pool_of_another_dimension_is_rejected(name):
    with raises("negatives must have the embedding dim of q (8), got shape (10, 7)"):
        hardneg.create_loss(name)(z(4), z(4), negatives=z(10, 7))


@pytest.mark.parametrize("name", LOSSES)
def test_a_batch_of_one_is_rejected(name):
    with raises(
        "need a batch of at least N = 2 samples (a contrastive loss needs negatives), got N = 1"
    ):
        hardneg.create_loss(name)(z(1), z(1))


@pytest.mark.parametrize("name", LOSSES)
def test_one_query_against_a_pool_is_a_loss(name):
    """A pool holds the negatives, so one query (the short last batch of a run) has a loss; for
    the strategies whose anchors do not share anything beyond the pool it is that query's loss
    in a batch of two (``reduction='none'``), and extra_views=None is no views."""
    g = torch.Generator().manual_seed(0)
    q, k, pool = (torch.randn(n, 8, generator=g) for n in (2, 2, 10))
    loss_fn = hardneg.create_loss(name)
    kw = {"generator": torch.Generator().manual_seed(1)} if loss_fn.draws else {}
    one = loss_fn(q[:1], k[:1], negatives=pool, extra_views=None, **kw)
    assert one.shape == () and torch.isfinite(one)
    if name in ("infonce", "debiased", "hcl", "hardness", "positive_aware"):
        both = loss_fn(q, k, negatives=pool, reduction="none")
        torch.testing.assert_close(one, both[0])


@pytest.mark.parametrize("name", LOSSES)
def test_an_empty_batch_or_bank_is_rejected_before_any_strategy_runs(name):
    """No anchor (N = 0), in-batch or with a bank, gets the batch-size message (not a bare row
    count, nor an error from deep inside a strategy: potential's numpy draws once failed on
    zero anchors); an empty bank names the bank."""
    need = "need a batch of at least N = 2 samples (a contrastive loss needs negatives), got N = 0"
    with raises("z1 and z2 " + need):
        hardneg.create_loss(name)(z(0), z(0))
    with raises("q and k " + need.replace("N = 2", "N = 1")):  # the pool holds negatives
        hardneg.create_loss(name)(z(0), z(0), negatives=z(10))
    with raises("negatives must have at least 1 rows, got 0"):
        hardneg.create_loss(name)(z(4), z(4), negatives=z(0))


@pytest.mark.parametrize("name", LOSSES)
def test_non_2d_and_non_float_inputs_are_rejected(name):
    with raises("z1 must be 2-D (rows x embedding dim), got shape (8,)"):
        hardneg.create_loss(name)(torch.randn(8), torch.randn(8))
    with raises("z1 must be a floating-point tensor, got dtype torch.int64"):
        hardneg.create_loss(name)(torch.ones(4, 8, dtype=torch.long), z())
    with raises("z1 must be a torch.Tensor, got list"):
        hardneg.create_loss(name)([[1.0, 2.0]], z())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", LOSSES)
def test_nan_or_inf_in_the_inputs_is_rejected(name, bad):
    x = z()
    x[2, 3] = bad
    with raises(
        "z2 contains 1 NaN or Inf value(s) (first in row 2); only finite embeddings are allowed"
    ):
        hardneg.create_loss(name)(z(), x)
    with raises("negatives contains 1 NaN or Inf value(s) (first in row 2)"):
        hardneg.create_loss(name)(z(), z(), negatives=torch.cat([x, z()]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_finite_check_agrees_with_isfinite_entry_by_entry(dtype):
    """The check reads one float64 sum first: it must accept every tensor of finite entries,
    those whose sum overflows included (float64 entries near its largest value), and reject
    an infinity of either sign, both signs together (their sum is NaN, not an infinity) and a
    NaN, counting them as ``torch.isfinite`` does."""
    from hardneg._checks import check_embeddings

    top = torch.finfo(dtype).max
    finite = [torch.full((3, 4), top, dtype=dtype), torch.full((3, 4), -top, dtype=dtype)]
    finite.append(torch.randn(3, 4).to(dtype))
    for x in finite:
        assert check_embeddings("x", x) is x
    if dtype == torch.float64:
        assert not math.isfinite(float(finite[0].sum()))  # the sum overflows; the entries do not
    for bad in ([float("inf")], [float("-inf")], [float("inf"), float("-inf")], [float("nan")]):
        x = torch.randn(3, 4).to(dtype)
        x[1, : len(bad)] = torch.tensor(bad, dtype=dtype)
        with raises(
            f"x contains {len(bad)} NaN or Inf value(s) (first in row 1); "
            "only finite embeddings are allowed"
        ):
            check_embeddings("x", x)


@pytest.mark.parametrize("name", LOSSES)
def test_embeddings_without_a_column_are_rejected_and_one_column_is_enough(name):
    """Zero columns get their own message with the shape; a single column is a valid (if
    degenerate) embedding: every loss takes it and gives a finite value."""
    with raises("z1 must have at least one column, got shape (4, 0)"):
        hardneg.create_loss(name)(z(4, 0), z(4, 0))
    with raises("q must have at least one column, got shape (4, 0)"):
        hardneg.create_loss(name)(z(4, 0), z(4, 0), negatives=z(10, 0))
    loss = hardneg.create_loss(name)(z(4, 1, seed=1), z(4, 1, seed=2))
    assert math.isfinite(float(loss))


def test_the_embedding_check_accepts_a_single_column():
    from hardneg._checks import check_embeddings

    x = z(3, 1)
    assert check_embeddings("x", x) is x
    with raises("x must have at least one column, got shape (3, 0)"):
        check_embeddings("x", z(3, 0))


def test_labels_of_the_wrong_shape_or_type_are_rejected():
    loss_fn = hardneg.create_loss("hcl")
    with raises("labels must have shape (4,), got (3,)"):
        loss_fn(z(), z(), labels=torch.arange(3), return_diagnostics=True)
    with raises("labels must hold integer class ids, got dtype torch.float32"):
        loss_fn(z(), z(), labels=torch.zeros(4), return_diagnostics=True)


def test_features_with_the_wrong_number_of_rows_are_rejected():
    with raises("h1 must have 4 rows (one per sample), got 3"):
        hardneg.create_loss("unremix")(z(), z(), h1=z(3, 5), h2=z(4, 5))


def test_an_exclude_index_outside_the_pool_is_rejected():
    with raises("exclude_index must hold positions in [0, 10) of the pool, got 10"):
        hardneg.create_loss("infonce")(
            z(), z(), negatives=z(10), exclude_index=torch.tensor([0, 1, 2, 10])
        )


@pytest.mark.parametrize("progress", [-0.1, 1.5])
def test_progress_outside_0_1_is_rejected(progress):
    with raises(f"progress must be in [0, 1], got {progress!r}"):
        hardneg.create_loss("ring", anneal="linear")(z(), z(), progress=progress)


def test_annealing_without_progress_names_what_is_missing():
    with raises("anneal='linear' needs the training progress: pass progress=<fraction in [0, 1]>"):
        hardneg.create_loss("ring", anneal="linear")(z(), z())
    hcl_message = (
        "beta_anneal='down' needs the training progress: pass progress=<fraction in [0, 1]>"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(hcl_message)}$"):  # the whole message
        hardneg.create_loss("hcl", beta_anneal="down")(z(), z())


# ------------------------------------------------------------------ names and hyper-parameters


def test_an_unknown_loss_name_suggests_the_closest():
    with raises("unknown loss name 'hlc' (did you mean 'hcl'?); allowed: "):
        hardneg.create_loss("hlc")
    with pytest.raises(ValueError, match="allowed: .*infonce.*ring"):
        hardneg.create_loss("nope")
    # a paper's spelling (upper case, a hyphen) finds the registered name
    with raises("unknown loss name 'HCL' (did you mean 'hcl'?)"):
        hardneg.create_loss("HCL")
    with raises("unknown loss name 'Positive-Aware' (did you mean 'positive_aware'?)"):
        hardneg.create_loss("Positive-Aware")


def test_a_strategy_class_instead_of_an_instance_says_so():
    from hardneg.strategies import ImportanceNegatives

    with raises("strategy must be a hardneg Strategy instance, got the class ImportanceNegatives"):
        hardneg.ContrastiveLoss(ImportanceNegatives)
    with raises("strategy must be a hardneg Strategy instance, got str"):
        hardneg.ContrastiveLoss("hcl")


def test_an_unknown_hyper_parameter_suggests_the_closest():
    with raises("unknown hyper-parameter 'betta' for loss 'hcl'; did you mean 'beta'?"):
        hardneg.create_loss("hcl", betta=1.0)
    with pytest.raises(ValueError) as caught:  # the suggestion ends its sentence: no "?."
        hardneg.create_loss("hcl", betta=1.0)
    assert "did you mean 'beta'? Allowed: " in str(caught.value)
    with pytest.raises(ValueError) as caught:  # without a suggestion, a full stop
        hardneg.create_loss("hcl", zzzz=1.0)
    assert "for loss 'hcl'. Allowed: " in str(caught.value)
    with raises("unknown hyper-parameter 'tau' for loss 'ring'"):
        hardneg.create_loss("ring", tau=0.1)
    with pytest.raises(ValueError, match="Allowed: .*rho_in.*rho_out"):
        hardneg.create_loss("ring", rho=0.1)


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_rejects_an_unknown_hyper_parameter(name):
    with raises(
        f"unknown hyper-parameter 'temprature' for loss {name!r}; did you mean 'temperature'?"
    ):
        hardneg.create_loss(name, temprature=0.5)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("t", [0.0, -0.5])
def test_temperature_must_be_positive(name, t):
    with raises(f"temperature must be in (0, inf), got {t!r}"):
        hardneg.create_loss(name, temperature=t)


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("hcl", dict(beta=-1.0), "beta must be in [0, inf), got -1.0"),
        ("unremix", dict(beta=-0.5), "beta must be in [0, inf), got -0.5"),
        ("hcl", dict(tau_plus=1.0), "tau_plus must be in [0, 1), got 1.0"),
        ("debiased", dict(tau_plus=-0.1), "tau_plus must be in [0, 1), got -0.1"),
        ("unremix", dict(tau_plus=1.5), "tau_plus must be in [0, 1), got 1.5"),
        ("hcl", dict(beta="1"), "beta must be a number, got '1' (str)"),
        ("hcl", dict(beta=float("nan")), "beta must be finite, got nan"),
        ("hcl", dict(beta_anneal="up"), "beta_anneal must be one of 'down', got 'up'"),
        ("hcl", dict(detach_weights="yes"), "detach_weights must be True or False, got 'yes'"),
        ("hcl", dict(anneal_epochs=0), "anneal_epochs must be in [1, inf), got 0"),
        ("hcl", dict(anneal_epochs=2.5), "anneal_epochs must be an integer, got 2.5"),
        ("ring", dict(rho_out=0.0), "rho_out must be in (0, 1], got 0.0"),
        ("ring", dict(rho_out=1.5), "rho_out must be in (0, 1], got 1.5"),
        ("ring", dict(rho_in=1.0), "rho_in must be in [0, 1), got 1.0"),
        (
            "ring",
            dict(lower=50.0, upper=10.0),
            "ring percentiles must satisfy 0 <= lower < upper <= 100, got lower=50, upper=10",
        ),
        ("ring", dict(lower=10.0, upper=10.0), "0 <= lower < upper <= 100, got lower=10, upper=10"),
        ("ring", dict(lower=-1.0, upper=10.0), "lower must be in [0, 100], got -1.0"),
        ("ring", dict(lower=0.0, upper=101.0), "upper must be in [0, 100], got 101.0"),
        (
            "ring",
            dict(lower=5.0),
            "give both lower and upper percentiles of the ring, got lower=5.0, upper=None",
        ),
        ("ring", dict(num_samples=0), "num_samples must be in [1, inf), got 0"),
        ("ring", dict(num_samples=2.5), "num_samples must be an integer, got 2.5"),
        (
            "ring",
            dict(anneal="cosine"),
            "anneal must be one of 'linear', 'staircase', got 'cosine'",
        ),
        ("ring", dict(anneal_until=2.0), "anneal_until must be in [0, 1], got 2.0"),
        ("ring", dict(anneal_steps=0), "anneal_steps must be in [1, inf), got 0"),
        ("unremix", dict(lambda_u=-1.0), "lambda_u must be in [0, inf), got -1.0"),
        ("unremix", dict(lambda_d=-1.0), "lambda_d must be in [0, inf), got -1.0"),
        ("unremix", dict(eps=0.0), "eps must be in (0, inf), got 0.0"),
        (
            "unremix",
            dict(influence="hessian"),
            "influence must be one of 'gradient_similarity', 'gradient_norm', got 'hessian'",
        ),
        (
            "unremix",
            dict(representativeness="both"),
            "representativeness must be one of 'diversity', 'density', got 'both'",
        ),
        ("hardness", dict(alpha=-1.0), "alpha must be in [0, inf), got -1.0"),
        (
            "hardness",
            dict(mode="hard"),
            "mode must be one of 'all_negatives', 'in_batch_negatives', 'hard_negatives', got 'hard'",
        ),
        ("positive_aware", dict(mode="top"), "mode must be one of 'margin', 'percent', got 'top'"),
        ("positive_aware", dict(margin="0.1"), "margin must be a number, got '0.1' (str)"),
        ("positive_aware", dict(percent=float("nan")), "percent must be finite, got nan"),
    ],
)
def test_out_of_range_hyper_parameters_name_the_parameter_value_and_range(name, kwargs, message):
    with raises(message):
        hardneg.create_loss(name, **kwargs)


def test_check_inputs_false_skips_validation_but_keeps_the_hyper_parameter_checks():
    loss_fn = hardneg.create_loss("infonce", check_inputs=False)
    assert torch.isfinite(loss_fn(z(), z()))
    with raises("temperature must be in (0, inf), got -1.0"):
        hardneg.create_loss("infonce", temperature=-1.0, check_inputs=False)


def test_a_sentence_transformers_scale_points_to_the_temperature():
    """``scale`` (sentence-transformers' 1 / temperature) is no hyper-parameter here: the error
    gives the temperature it means."""
    with raises("sentence-transformers' scale=20 is temperature=0.05)"):
        hardneg.create_loss("infonce", scale=20)
    with raises("sentence-transformers' scale=-1 is temperature=1/scale)"):
        hardneg.create_loss("hcl", scale=-1)


# ------------------------------------------------------------------------------ call forms


@pytest.mark.parametrize("name", LOSSES)
def test_extra_views_beside_a_pool_or_hard_negatives_are_rejected(name):
    """``extra_views`` belong to the in-batch form; beside a pool or hard negatives they used to be
    dropped without a word (the loss equal to the call without them)."""
    loss_fn = hardneg.create_loss(name)
    with raises("extra_views belong to the in-batch form (loss(z1, z2, extra_views=[...]))"):
        loss_fn(z(), z(), negatives=z(10), extra_views=[z(seed=3)])
    with raises("extra_views belong to the in-batch form"):
        loss_fn(z(), z(), hard_negatives=z(8).reshape(4, 2, 8), extra_views=[z(seed=3)])
    # the check is about the call, not the data: it stands without check_inputs too
    with raises("extra_views belong to the in-batch form"):
        hardneg.create_loss(name, check_inputs=False)(
            z(), z(), negatives=z(10), extra_views=[z(seed=3)]
        )


@pytest.mark.parametrize("name", LOSSES)
def test_ids_beside_a_shared_pool_are_rejected_and_point_to_exclude_index(name):
    """A pool's rows have no ids here: ``ids`` beside ``negatives=`` used to be ignored, so a
    user masking a query's own bank entry by id got an unmasked loss."""
    with raises("ids mask duplicates in the in-batch and retrieval forms; with a pool"):
        hardneg.create_loss(name)(z(), z(), negatives=z(10), ids=torch.arange(4))
    with raises("use exclude_index=[N]"):
        hardneg.create_loss(name, check_inputs=False)(
            z(), z(), negatives=z(10), ids=torch.arange(4)
        )


def test_views_on_different_devices_are_named_before_any_computation():
    """z2 on another device (here the meta device, which exists on every machine) gives one
    message naming both devices, not torch's error from inside the finite check or a product."""
    loss_fn = hardneg.create_loss("hcl")
    with raises("z1 and z2 must be on the same device, got cpu and meta"):
        loss_fn(z(), z().to("meta"))
    with raises("q and negatives must be on the same device, got cpu and meta"):
        loss_fn(z(), z(), negatives=z(10).to("meta"))
    with raises("z1 and hard_negatives must be on the same device, got cpu and meta"):
        loss_fn(z(), z(), hard_negatives=z(8).reshape(4, 2, 8).to("meta"))
    with raises("z1 and extra_views[0] must be on the same device, got cpu and meta"):
        loss_fn(z(), z(), extra_views=[z().to("meta")])


def test_return_diagnostics_must_be_a_bool():
    """A truthy non-bool (a string from a config, a tensor) is refused rather than guessed."""
    loss_fn = hardneg.create_loss("hcl")
    with raises("return_diagnostics must be True or False, got 'yes'"):
        loss_fn(z(), z(), return_diagnostics="yes")


def test_diagnostic_labels_that_a_call_form_cannot_use_are_refused():
    """``negative_labels`` without a pool, or ``labels`` with hard negatives (whose classes are
    unknown), used to return diagnostics whose class-based fields were silently None."""
    loss_fn = hardneg.create_loss("hcl")
    hard = z(8).reshape(4, 2, 8)
    with raises("negative_labels (the classes of the pool's rows) need negatives=..."):
        loss_fn(z(), z(), negative_labels=torch.arange(4), return_diagnostics=True)
    with raises("negative_labels (the classes of the pool's rows) need negatives=..."):
        loss_fn(
            z(), z(), hard_negatives=hard, negative_labels=torch.arange(4), return_diagnostics=True
        )
    with raises("labels cannot be used with hard_negatives"):
        loss_fn(z(), z(), hard_negatives=hard, labels=torch.arange(4), return_diagnostics=True)
    with raises("labels with a pool need negative_labels (the classes of the pool's rows"):
        loss_fn(z(), z(), negatives=z(10), labels=torch.arange(4), return_diagnostics=True)
    pool_labels = torch.arange(10) % 4
    out = loss_fn(
        z(),
        z(),
        negatives=z(10),
        labels=torch.arange(4),
        negative_labels=pool_labels,
        return_diagnostics=True,
    )
    assert out.diagnostics.false_negative_mass is not None
    # the forms that use them still do
    out = loss_fn(z(), z(), labels=torch.tensor([0, 0, 1, 1]), return_diagnostics=True)
    assert out.diagnostics.false_negative_mass is not None


def test_bad_filter_options_name_the_filter_and_its_allowed_options():
    """A misspelt filter option used to surface as Python's TypeError from the filter's
    ``__init__``, and a non-dict as ``dict()``'s "update sequence element" error."""
    with raises(
        "unknown filter option 'topk' for filter 'fnc' (did you mean 'top_k'?); "
        "allowed: mode, top_k, threshold, agg"
    ):
        hardneg.create_loss("hcl", filter="fnc", filter_options={"topk": 1})
    with raises("filter_options must be a dict of the filter's options, got list"):
        hardneg.create_loss("hcl", filter="fnc", filter_options=[("top_k", 1)])
    # a valid one still reaches the filter
    loss_fn = hardneg.create_loss("hcl", filter="fnc", filter_options={"top_k": 3})
    assert loss_fn.filter_strategy.top_k == 3


def test_numpy_scalars_are_numbers():
    """Hyper-parameters read from numpy (a sweep over np.linspace, an array element) are numbers:
    np.float32 / np.int64 used to be refused as "must be a number, got np.float32(0.5)"."""
    np = pytest.importorskip("numpy")
    loss_fn = hardneg.create_loss("hcl", temperature=np.float32(0.5), beta=np.float32(0.25))
    assert loss_fn.temperature == 0.5 and type(loss_fn.temperature) is float
    assert loss_fn.strategy.beta == 0.25
    fnc = hardneg.create_loss("fnc", top_k=np.int64(2))
    assert fnc.strategy.top_k == 2 and type(fnc.strategy.top_k) is int
    ref = hardneg.create_loss("hcl", temperature=0.5, beta=0.25)(z(), z(), progress=0.5)
    got = loss_fn(z(), z(), progress=np.float32(0.5))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # still refused: booleans (numpy's too), strings, tensors, non-integral integers
    for bad in (True, np.bool_(True), "0.5", torch.tensor(0.5)):
        with raises("temperature must be a number"):
            hardneg.create_loss("hcl", temperature=bad)
    with raises("top_k must be an integer, got np.float32(2.5)"):
        hardneg.create_loss("fnc", top_k=np.float32(2.5))


def test_features_a_call_form_would_ignore_are_refused():
    """unremix reads features (``feature_kind='hidden'``) only as a complete set of its call
    form; an incomplete one used to fall back to the embeddings without a word."""
    loss_fn = hardneg.create_loss("unremix")
    h = z(4, 5, seed=7)
    with raises("unremix uses features in the in-batch form only as h1 and h2 together"):
        loss_fn(z(), z(), h1=h)
    with raises("unremix uses features in the in-batch form only as h1 and h2 together"):
        loss_fn(z(), z(), h2=h)
    with raises("with extra_views, h1 and h2 would be ignored"):
        loss_fn(z(), z(), h1=h, h2=h, extra_views=[z(seed=3)])
    with raises("with hard_negatives, h1 and h2 would be ignored"):
        loss_fn(z(), z(), hard_negatives=z(8).reshape(4, 2, 8), h1=h)
    with raises("negative_h (features of the pool's rows) needs negatives=[K, d]"):
        loss_fn(z(), z(), h1=h, h2=h, negative_h=h)
    # the complete set is used: the loss differs from the one on the embeddings
    plain = loss_fn(z(), z(seed=1))
    with_h = loss_fn(z(), z(seed=1), h1=h, h2=z(4, 5, seed=8))
    assert not torch.allclose(plain, with_h)


def test_a_pool_and_hard_negatives_together_are_refused_even_without_input_checks():
    """check_inputs=False skips the data checks (host syncs), not the call form: with both, the
    pool used to win and the hard negatives were dropped without a word."""
    for check in (True, False):
        loss_fn = hardneg.create_loss("infonce", check_inputs=check)
        with raises("give either negatives (a pool) or hard_negatives, not both"):
            loss_fn(z(), z(), negatives=z(10), hard_negatives=z(8).reshape(4, 2, 8))
