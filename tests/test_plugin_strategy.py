"""A strategy is one file: a class registered from *this* test module trains through
``hardneg train``, is listed and described by ``hardneg losses`` and appears in ``hardneg
compare``, with no other file of the library changed.

The plug-in keeps each anchor's ``k`` hardest (most similar) negatives. It declares
``feature_kind = 'hidden'``, so the framework hands it the head's hidden features without naming
it anywhere; ``in_batch_defaults`` gives it another ``k`` under ``compare`` on in-batch negatives.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import hardneg
from hardneg.cli import main
from hardneg.contrast import ContrastSet, in_batch_contrast
from hardneg.registry import register_strategy, unregister_strategy
from hardneg.strategies import Selection, StepContext, Strategy

NAME = "topk_hardest"


class TopKHardest(Strategy):
    """Keep the k hardest negatives of each anchor (a test plug-in).

    Args:
        k: negatives kept per anchor, an integer >= 1.
    """

    supports_debiasing = False
    feature_kind = "hidden"
    in_batch_defaults = {"k": 6}
    seen: list[tuple[int, int | None]] = []  # (negatives M, hidden width) of each call

    def __init__(self, *, k: int = 8) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.k = k

    def select(self, contrast: ContrastSet, context: StepContext) -> Selection:
        features = contrast.anchor_features
        width = None if features is None else features.shape[1]
        TopKHardest.seen.append((int(contrast.num_negatives), width))
        logits = contrast.negative_logits.detach()
        top = logits.topk(min(self.k, logits.shape[1]), dim=1).indices
        log_w = torch.full_like(logits, float("-inf")).scatter(1, top, 0.0)
        return Selection(
            negative_log_weights=log_w.masked_fill(~torch.isfinite(logits), -torch.inf)
        )


@pytest.fixture
def plugin():
    register_strategy(NAME, summary="the k hardest negatives (test plug-in)")(TopKHardest)
    TopKHardest.seen.clear()
    yield TopKHardest
    unregister_strategy(NAME)
    assert NAME not in hardneg.list_losses()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_plugin_selects_the_hardest_negatives(plugin):
    loss = hardneg.create_loss(NAME, k=2, temperature=0.5)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    out = loss(z1, z2, return_diagnostics=True)
    assert (out.diagnostics.kept_negatives == 2).all()
    assert not torch.allclose(out.loss, hardneg.create_loss("infonce", temperature=0.5)(z1, z2))
    with pytest.raises(ValueError, match="tau_plus"):
        hardneg.create_loss(NAME, tau_plus=0.1)  # the registry read supports_debiasing


def test_hardneg_losses_describes_the_plugin_from_its_signature(plugin, capsys):
    assert main(["losses"]) == 0
    text = capsys.readouterr().out
    assert "topk_hardest: the k hardest negatives (test plug-in)" in text
    assert "k=8: negatives kept per anchor, an integer >= 1." in text
    assert "check_inputs=True" in text.split("topk_hardest:")[1]  # loss-level settings too
    for name in hardneg.list_losses():  # every registered loss, with its full help
        assert hardneg.describe_loss(name) in text


TINY = ["data.subset=256", "train.batch_size=128", "train.device=cpu", "model.out_dim=16",
        "train.diagnostics_every=1", "train.knn_every=1", "train.epochs=1"]  # fmt: skip


def test_the_plugin_trains_through_hardneg_train(plugin, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--config", "mnist1d_simclr_hcl", "--run-dir", str(run), "--no-progress",
            "loss={name: topk_hardest, k: 4, temperature: 0.5}", *TINY]  # fmt: skip
    assert main(args) == 0
    assert "name: topk_hardest" in (run / "config.yaml").read_text()
    assert (run / "checkpoints" / "final.pt").is_file()
    # 2 steps of 2 x 128 anchors: 254 negatives each, the head's hidden features (width 512)
    assert plugin.seen and all(seen == (254, 512) for seen in plugin.seen)


def test_the_plugin_appears_in_compare(plugin, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--strategies", f"infonce,{NAME}", "--seeds", "1", "--out", str(out),
            "--no-linear", "--tsne-points", "0", f"{NAME}.temperature=0.4", *TINY]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    table = text[re.search(r"strategy +seeds", text).start() :]
    assert re.search(rf"^{NAME} +1 ", table, re.MULTILINE)
    assert f"| {NAME} | 1 |" in (out / "report.md").read_text()
    config = (out / NAME / "seed0" / "config.yaml").read_text()
    assert "k: 6" in config and "temperature: 0.4" in config  # in_batch_defaults, overrides
    metrics = json.loads((out / NAME / "seed0" / "metrics.json").read_text())
    assert 0 <= metrics["knn_top1"] <= 100
    assert plugin.seen


class TwoKnobs(Strategy):
    """A plug-in with two hyper-parameters, for the base class's repr."""

    def __init__(self, *, alpha: float = 1.0, mode: str = "a") -> None:
        super().__init__()
        self.alpha, self.mode = alpha, mode


def test_the_base_class_prints_the_hyper_parameters_and_refuses_keep_for_a_non_filter():
    assert repr(TwoKnobs(alpha=0.5, mode="b")) == "TwoKnobs(alpha=0.5, mode='b')"
    assert repr(TopKHardest(k=3)) == "TopKHardest(k=3)"
    contrast = in_batch_contrast((torch.randn(3, 2), torch.randn(3, 2)), temperature=1.0)
    with pytest.raises(NotImplementedError, match="^TopKHardest is not a filter$"):
        TopKHardest().keep(contrast, StepContext())


class Plain:
    """Not a Strategy."""


class Positional(Strategy):
    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()


class NoDefault(Strategy):
    def __init__(self, *, beta: float) -> None:
        super().__init__()


@pytest.mark.parametrize(
    ("name", "cls", "message"),
    [
        ("plain", Plain, f"register_strategy('plain') expects a Strategy subclass, got {Plain!r}"),
        ("Two-Knobs", TwoKnobs, "a strategy name must be lower_snake_case, got 'Two-Knobs'"),
        ("infonce", TwoKnobs, "a loss named 'infonce' is already registered"),
        (
            "positional",
            Positional,
            "Positional.__init__ must take only keyword-only hyper-parameters "
            "(def __init__(self, *, ...)); 'beta' is not",
        ),
        ("no_default", NoDefault, "NoDefault.__init__: hyper-parameter 'beta' needs a default"),
    ],
)
def test_registration_refusals_carry_their_exact_message(name, cls, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        register_strategy(name)(cls)
    from hardneg.registry import strategy_class

    # nothing registered, nothing replaced
    assert name not in hardneg.list_losses() or strategy_class(name) is not cls


def test_a_registered_plugin_is_named_described_and_listed_in_the_help():
    from hardneg.registry import refresh_docs

    doc = TwoKnobs.__doc__
    try:
        assert register_strategy("two_knobs")(TwoKnobs) is TwoKnobs
        assert register_strategy("two_knobs")(TwoKnobs) is TwoKnobs  # the same class again: fine
        assert TwoKnobs.name == "two_knobs"
        text = hardneg.describe_loss("two_knobs")
        # no summary: the docstring's first line; the loss settings with their meanings, then
        # the strategy's own, which its docstring does not describe (no "Args:")
        assert text.startswith(
            "two_knobs: A plug-in with two hyper-parameters, for the base class's repr.\n"
            "\n"
            "hyper-parameters (default: meaning):\n"
            "  temperature=0.5: ``t > 0``.\n"
        )
        assert text.endswith("\n  alpha=1.0\n  mode='a'")
        # the help of create_loss and of the class gain the description
        help_text = hardneg.create_loss.__doc__
        assert help_text.startswith("Build the loss registered as ``name``")
        assert "returns the same text.\n\nRegistered losses:\n\ninfonce: " in help_text
        assert help_text.endswith("\n\n" + text + "\n")
        assert TwoKnobs.__doc__ == f"{doc.rstrip()}\n\n{text}\n"
        register_strategy("two_knobs", summary="two knobs")(TwoKnobs)
        assert hardneg.describe_loss("two_knobs").startswith("two_knobs: two knobs\n")
    finally:
        unregister_strategy("two_knobs")
        if "summary" in vars(TwoKnobs):
            del TwoKnobs.summary  # back to the base class's
        TwoKnobs.__doc__ = doc
        refresh_docs()
    assert "two_knobs" not in hardneg.list_losses()


def test_unknown_names_and_keywords_are_refused_with_the_exact_message():
    names = ", ".join(hardneg.list_losses())
    for name in ("Positive Aware", "Positive-Aware"):  # a paper's spelling: the registered one
        message = f"unknown loss name {name!r} (did you mean 'positive_aware'?); allowed: {names}"
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            hardneg.create_loss(name)
    settings = (
        "check_inputs, fast, filter, filter_options, normalize, objective, positive_mode, "
        "tau_plus, temperature"
    )
    # sentence-transformers' scale: 1 / temperature when it is a positive number
    for scale, as_t in (
        (20, "temperature=0.05"),
        (0.5, "temperature=2"),
        (0, "temperature=1/scale"),
    ):
        message = (
            f"unknown hyper-parameter 'scale' for loss 'infonce' (logits are cos / temperature: "
            f"sentence-transformers' scale={scale!r} is {as_t}). Allowed: {settings}"
        )
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            hardneg.create_loss("infonce", scale=scale)
    unregister_strategy("never_registered")  # unregistering an unknown name is a no-op


def test_tau_plus_and_unknown_loss_defaults_are_refused_with_the_exact_message():
    # a strategy that selects negatives has no debiased estimator: the message says why tau_plus
    # is not among the allowed names (the loss settings but tau_plus, then Ring's own)
    message = (
        "unknown hyper-parameter 'tau_plus' for loss 'ring' (ring selects negatives: the debiased "
        "estimator does not apply). Allowed: check_inputs, fast, filter, filter_options, "
        "normalize, objective, positive_mode, temperature, anneal, anneal_steps, anneal_until, "
        "lower, num_samples, rho_in, rho_out, upper"
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        hardneg.create_loss("ring", tau_plus=0.1)

    class MisspeltDefaults(TopKHardest):
        """A plug-in whose loss defaults name a setting the loss does not have."""

        loss_defaults = {"temprature": 0.2}

    # refused when registered (registration builds the loss's settings), and never listed
    message = "MisspeltDefaults.loss_defaults names an unknown setting 'temprature'"
    try:
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            register_strategy("misspelt_defaults", summary="misspelt")(MisspeltDefaults)
        assert "misspelt_defaults" not in hardneg.list_losses()
        # nor does it block the next plug-in (every later registration refreshes the help)
        register_strategy(NAME, summary="the k hardest negatives (test plug-in)")(TopKHardest)
        assert isinstance(hardneg.create_loss(NAME, k=2).strategy, TopKHardest)
    finally:
        unregister_strategy("misspelt_defaults")
        unregister_strategy(NAME)


def test_a_plugins_docstring_gains_its_help_after_its_own_text(plugin):
    # the class's docstring ends in blanks ("\n    "): they are stripped before the help
    assert (
        "        k: negatives kept per anchor, an integer >= 1.\n\n"
        "topk_hardest: the k hardest negatives (test plug-in)\n\nhyper-parameters (default: "
        "meaning):\n"
    ) in TopKHardest.__doc__


def test_args_sections_share_a_meaning_between_names_and_join_continued_lines():
    from hardneg.registry import _arg_docs

    class Documented:
        """Summary.

        Args:
            low, high: the bounds of the range,
                both inclusive.
            step: the spacing
                between values,
                in units.

        Returns:
            nothing read.
        """

    assert _arg_docs(Documented) == {
        "low": "the bounds of the range, both inclusive.",
        "high": "the bounds of the range, both inclusive.",
        "step": "the spacing between values, in units.",
    }
