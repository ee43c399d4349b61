"""Config loading and validation: every error names the key and what is allowed, and it comes
before any data or model is touched."""

from __future__ import annotations

import pytest

import hardneg.data
from hardneg.config import (
    TrainConfig,
    list_configs,
    load_config,
    resolve_config_path,
    resolved_loss_params,
)
from hardneg.frameworks import FRAMEWORKS


def test_defaults_load_and_round_trip():
    config = load_config(None)
    assert isinstance(config, TrainConfig)
    again = TrainConfig.from_dict(config.to_dict())
    assert again == config


def test_overrides_are_parsed_as_yaml():
    config = load_config(
        None,
        [
            "loss.name=hcl",
            "loss.beta=2",
            "optim.lr=1e-3",  # YAML 1.1 reads 1e-3 as a string; a float field accepts it
            "framework.symmetric=true",
            "framework.name=moco",
            "train.channels_last=false",
            "data.subset=null",
        ],
    )
    assert config.loss.name == "hcl" and config.loss.params["beta"] == 2
    assert config.optim.lr == pytest.approx(1e-3)
    assert config.framework.symmetric is True
    assert config.train.channels_last is False
    assert config.data.subset is None


def test_scientific_notation_without_a_dot_is_a_number_everywhere(tmp_path):
    """YAML 1.1 (PyYAML) reads ``1e-2`` as a string; the loss, augmentation and integer keys,
    which do not coerce strings like the float fields of the sections, got ``'1e-2'`` and
    refused it ("temperature must be a number, got '1e-2'")."""
    config = load_config(
        "mnist1d_simclr_hcl",
        ["loss.temperature=2e-1", "loss.beta=5E-1", "augment.noise_std=1e-2", "train.epochs=1e1"],
    )
    assert config.loss.params["temperature"] == 0.2 and config.loss.params["beta"] == 0.5
    assert config.augment.params["noise_std"] == 0.01
    assert config.train.epochs == 10 and isinstance(config.train.epochs, int)
    file = tmp_path / "sci.yaml"
    file.write_text("loss: {name: hcl, tau_plus: -1e-1}\noptim: {lr: 3e-4}\n")
    with pytest.raises(ValueError, match=r"tau_plus must be in \[0, 1\), got -0.1"):
        load_config(file)  # a negative exponent form is a number too, checked for its range
    file.write_text("loss: {name: hcl, tau_plus: 5e-2}\noptim: {lr: 3e-4}\n")
    config = load_config(file)
    assert config.loss.params["tau_plus"] == 0.05 and config.optim.lr == 3e-4
    with pytest.raises(ValueError, match="got '1e3x'"):  # not a number: still a string
        load_config(None, ["train.epochs=1e3x"])


def test_a_dict_override_replaces_the_whole_loss_section():
    config = load_config(None, ["loss.name=hcl", "loss.beta=2", "loss={name: ring, rho_out: 0.5}"])
    assert config.loss.name == "ring" and config.loss.params["rho_out"] == 0.5
    assert "beta" not in config.loss.params  # nothing of hcl's section is left


def test_to_dict_flattens_loss_and_augment_parameters():
    config = load_config(None, ["loss.name=hcl", "loss.beta=0.5", "augment.noise_std=0.2"])
    d = config.to_dict()
    assert d["loss"] == {"name": "hcl", **resolved_loss_params("hcl", {"beta": 0.5})}
    assert d["loss"]["beta"] == 0.5 and d["loss"]["tau_plus"] == 0.1  # every hparam, stated
    assert d["augment"] == {
        "recipe": "simclr",
        "noise_std": 0.2,  # the recipe's override, flat beside the section's own settings
        "small_size": None,
        "small_scale_min": 0.05,
        "small_scale_max": 0.14,
    }


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.bach_size=3", "did you mean train.batch_size"),
        ("optimizer.lr=0.1", "did you mean optim"),
        ("framework.queue_sise=10", "did you mean framework.queue_size"),
        ("train.batch_size=1", "train.batch_size must be >= 2, got 1"),
        ("train.batch_size=abc", "train.batch_size must be an integer"),
        ("train.epochs=2.5", "train.epochs must be an integer"),
        ("optim.lr=0", "optim.lr must be > 0"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("framework.momentum=1.5", "framework.momentum must be <= 1"),
        ("train.precision=fp8", "train.precision must be one of 'auto', 'fp32', 'bf16', 'fp16'"),
        ("train.nonfinite=ignore", "train.nonfinite must be one of 'stop', 'skip'"),
        ("train.device=gpu", "train.device must be auto, cpu, mps, cuda or cuda:N"),
        ("framework.bank_negatives=most", "framework.bank_negatives must be an integer or 'all'"),
        ("framework.name=byol", "framework.name must be one of 'simclr', 'moco', 'memory_bank'"),
        ("model.backbone=resnet19", "did you mean 'resnet18'"),
        ("model.head=mlp", "model.head must be one of"),
        ("loss.name=hcll", "did you mean 'hcl'"),
        ("loss.bta=1", "unknown hyper-parameter 'bta'"),
        ("data.dataset=cifar11", "data.dataset"),
        ("augment.nois_std=0.1", "augment"),
        ("train.epochs", "must look like section.key=value"),
    ],
)
def test_invalid_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ValueError, match=None) as err:
        load_config(None, ["data.dataset=mnist1d", "model.backbone=cnn1d", override])
    assert message in str(err.value)


def test_loss_hyper_parameters_are_checked_by_building_the_loss():
    with pytest.raises(ValueError, match=r"loss: .*beta"):
        load_config(None, ["loss.name=hcl", "loss.beta=-1"])
    with pytest.raises(ValueError, match="tau_plus"):
        load_config(None, ["loss.name=ring", "loss.tau_plus=0.1"])


def test_framework_options_that_do_not_apply_are_rejected():
    with pytest.raises(ValueError, match="predictor applies to moco only"):
        load_config(None, ["framework.name=simclr", "framework.predictor=true"])
    with pytest.raises(ValueError, match="framework.shuffle_bn applies to moco only"):
        load_config(None, ["framework.name=simclr", "framework.shuffle_bn=true"])
    # auto (the default) and false are fine everywhere
    load_config(None, ["framework.name=memory_bank", "framework.shuffle_bn=false"])


def test_batch_norm_options():
    config = load_config(None)
    assert config.framework.shuffle_bn == "auto" and config.train.sync_bn is False
    assert config.model.predictor_last_bn is True
    config = load_config(
        None,
        [
            "framework.name=moco",
            "framework.shuffle_bn=false",
            "train.sync_bn=true",
            "model.predictor_last_bn=false",
        ],
    )
    assert config.framework.shuffle_bn is False and config.train.sync_bn is True
    assert config.model.predictor_last_bn is False
    with pytest.raises(ValueError, match="framework.shuffle_bn must be one of 'auto', True, False"):
        load_config(None, ["framework.shuffle_bn=sometimes"])
    with pytest.raises(ValueError, match="train.sync_bn must be true or false, got 'maybe'"):
        load_config(None, ["train.sync_bn=maybe"])
    with pytest.raises(ValueError, match="model.predictor_last_bn must be true or false"):
        load_config(None, ["model.predictor_last_bn=1"])


def test_validation_happens_before_any_data_is_loaded(monkeypatch, tmp_path):
    def no_data(*args, **kwargs):
        raise AssertionError("data must not be loaded for an invalid config")

    monkeypatch.setattr(hardneg.data, "load_dataset", no_data)
    with pytest.raises(ValueError, match="did you mean train.epochs"):
        load_config(None, ["train.epoch=3"])
    from hardneg.train import train

    with pytest.raises(ValueError, match="train.batch_size must be >= 2"):
        train({"train": {"batch_size": 0}}, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1, 2}\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="a config must be a mapping"):
        load_config(listed)
    with pytest.raises(FileNotFoundError, match="neither a file nor a packaged config"):
        load_config(tmp_path / "missing.yaml")


def test_a_key_given_twice_in_a_yaml_file_is_an_error_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys without a word: a second ``train:`` section
    appended to a file reset the first one's epochs to the default."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("train: {epochs: 50}\nloss: {name: hcl}\ntrain: {batch_size: 128}\n")
    with pytest.raises(ValueError) as err:
        load_config(twice)
    assert str(err.value) == (
        f"{twice}: not valid YAML at line 3, column 1: the key 'train' is given twice (first at "
        "line 1); the second would replace the first: merge them"
    )
    inner = tmp_path / "inner.yaml"
    inner.write_text("loss:\n  name: hcl\n  beta: 2\n  beta: 0.5\n")
    with pytest.raises(ValueError, match=r"line 4, column 3: the key 'beta' is given twice"):
        load_config(inner)
    listed = tmp_path / "listed.yaml"  # a list as a key stopped the check with a TypeError
    listed.write_text("train: {[1, 2]: 3}\n")
    with pytest.raises(ValueError, match="line 1, column 9: found unhashable key"):
        load_config(listed)
    # a merge key is not a repeated key: '<<: *base' may be overridden
    from hardneg.config import load_yaml

    assert load_yaml("a: &b {x: 1, y: 2}\nc: {<<: *b, x: 3}\n") == {
        "a": {"x": 1, "y": 2},
        "c": {"x": 3, "y": 2},
    }


def test_a_yaml_syntax_error_is_one_line_with_its_position(tmp_path):
    # PyYAML's own message spans four lines (the file again and a caret under the line)
    bad = tmp_path / "tab.yaml"
    bad.write_text("train:\n\tepochs: 2\n")
    with pytest.raises(ValueError) as err:
        load_config(bad)
    assert str(err.value) == (
        f"{bad}: not valid YAML at line 2, column 1: found character '\\t' that cannot start "
        "any token"
    )


def test_every_packaged_config_is_valid_and_loadable_by_name():
    names = list_configs()
    assert "mnist1d_simclr_hcl" in names
    registered = hardneg.list_losses()
    for name in names:
        if "potential" in name and "potential" not in registered:
            continue  # the potential loss is being ported; its configs load again once it is
        config = load_config(name)
        assert resolve_config_path(name).name == f"{name}.yaml"
        assert config.framework.name in FRAMEWORKS


def test_framework_choices_match_the_framework_registry():
    from hardneg import config as config_module

    assert set(config_module.FRAMEWORKS) == set(FRAMEWORKS)
