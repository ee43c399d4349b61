"""Training configuration: a YAML file with sections, validated before any data or model is touched.

A config is a :class:`TrainConfig` of section dataclasses; every field states its type, its range
or choices and, in one line, what it does (``hardneg train --help`` and the README point here)::

    seed: 0
    data: {dataset: mnist1d}
    augment: {recipe: simclr}                 # extra keys are passed to build_augmentation
    model: {backbone: cnn1d, head: simclr, out_dim: 128}     # backbone auto: the data set's
    framework: {name: simclr}
    loss: {name: hcl, beta: 1.0, tau_plus: 0.1, temperature: 0.5}   # keys = create_loss hparams
    optim: {name: adam, lr: 1.0e-3, weight_decay: 1.0e-6}
    train: {epochs: 20, batch_size: 256}
    eval: {knn_k: 200, knn_temperature: 0.1}

:func:`load_config` reads a file (or a packaged config by name, see :func:`list_configs`) and
applies ``key.sub=value`` overrides whose values are parsed as YAML. Errors name the key: an
unknown key suggests the closest valid one, a wrong type or range says what is allowed, and the
loss hyper-parameters are checked by building the loss (cheap) with :func:`hardneg.create_loss`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.resources
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hardneg._checks import closest_hint, utf8_file


def _opt(
    default: Any,
    doc: str,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[Any, ...] | None = None,
    low_open: bool = False,
) -> Any:
    """A config field: its default, a one-line doc, and its allowed range or choices."""
    meta = {"doc": doc, "low": low, "high": high, "choices": choices, "low_open": low_open}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


FRAMEWORKS = ("simclr", "moco", "memory_bank")  # = hardneg.frameworks.FRAMEWORKS (tested)


@dataclass
class DataConfig:
    dataset: str = _opt("mnist1d", "data set name (hardneg.data.load_dataset)")
    data_dir: str | None = _opt(None, "where the data set lives (None = the library default)")
    download: bool = _opt(False, "download the data set if it is missing")
    split: str | None = _opt(None, "pre-training split (None = the data set's default)")
    subset: int | None = _opt(None, "train on the first N images only (quick runs)", low=2)
    image_size: int | None = _opt(None, "resize images to this size (None = native)", low=1)


@dataclass
class AugmentConfig:
    recipe: str = _opt("simclr", "augmentation recipe (hardneg.augment.build_augmentation)")
    params: dict[str, Any] = _opt({}, "overrides of the recipe (flat keys in YAML)")
    small_size: int | None = _opt(
        None,
        "framework.small_crops: side of the small crops (None: 96/224 of the views' side, "
        "SwAV's ratio, at least 4 px)",
        low=1,
    )
    small_scale_min: float = _opt(
        0.05, "framework.small_crops: smallest area fraction of a small crop (SwAV: 0.05)", low=0.0
    )
    small_scale_max: float = _opt(
        0.14, "framework.small_crops: largest area fraction of a small crop (SwAV: 0.14)", high=1.0
    )


@dataclass
class ModelConfig:
    backbone: str = _opt(
        "auto",
        "encoder (hardneg.models.BACKBONES); auto = the data set's: cnn1d for 1-D signals, "
        "digits_cnn for 8 px digits, resnet18 for other images",
    )
    head: str = _opt("simclr", "projection head (hardneg.models.HEADS)")
    out_dim: int = _opt(128, "projection dimension (not used by head 'none')", low=1)
    head_hidden: int | None = _opt(
        None, "hidden width of the head (None = the head's default)", low=1
    )
    predictor_hidden: int = _opt(512, "hidden width of the predictor (framework.predictor)", low=1)
    predictor_last_bn: bool = _opt(
        True, "predictor ends with an affine-free BN, as in the PSM code (false: Linear with bias)"
    )


@dataclass
class FrameworkConfig:
    name: str = _opt(
        "simclr", "simclr (in-batch) | moco (queue) | memory_bank (IR)", choices=FRAMEWORKS
    )
    momentum: float = _opt(0.99, "moco: EMA momentum of the key encoder", low=0.0, high=1.0)
    queue_size: int = _opt(4096, "moco: number of keys in the queue", low=2)
    symmetric: bool = _opt(False, "moco: average loss(q1, k2) and loss(q2, k1)")
    views: int = _opt(
        2,
        "simclr: full-size views of each image; each view is an anchor whose positives are the "
        "image's other views and small crops (several positives per anchor)",
        low=2,
    )
    small_crops: int = _opt(
        0,
        "simclr: low-resolution crops of each image besides the views (multi-crop, Caron et "
        "al. 2020), each an anchor too (augment.small_size, augment.small_scale_*)",
        low=0,
    )
    predictor: bool = _opt(False, "moco: online predictor on the queries (PSM)")
    enqueue: str = _opt(
        "both",
        "moco symmetric: enqueue the keys of both views or of view 2",
        choices=("both", "second"),
    )
    shuffle_bn: bool | str = _opt(
        "auto",
        "moco under torchrun: keys from a batch shuffled across ranks (MoCo v2 shuffle-BN); "
        "auto = on unless train.sync_bn; no effect in one process",
        choices=("auto", True, False),
    )
    bn_splits: int = _opt(
        1,
        "moco: batch-norm groups of the global batch, as MoCo v2's per-GPU BN (8 GPUs); with "
        "R processes each splits its share into bn_splits / R; in one process this (with "
        "shuffle_bn) emulates shuffle-BN; 1 = plain BN",
        low=1,
    )
    bank_momentum: float = _opt(
        0.5, "memory_bank: m of M[i] = normalize(m M[i] + (1-m) q)", low=0.0, high=1.0
    )
    bank_negatives: int | str = _opt(4096, "memory_bank: uniform draws per step, or 'all'", low=1)
    bank_draws: str = _opt(
        "auto",
        "memory_bank: each anchor draws its own rows (per_anchor, IR's NCE) or the batch shares "
        "one draw (shared); auto = per_anchor unless the strategy scores shared columns only",
        choices=("auto", "per_anchor", "shared"),
    )


@dataclass
class LossConfig:
    name: str = _opt("infonce", "loss name (hardneg.create_loss); other keys are its hparams")
    params: dict[str, Any] = _opt({}, "hyper-parameters (flat keys in YAML)")


@dataclass
class OptimConfig:
    name: str = _opt("adam", "optimizer", choices=("adam", "adamw", "sgd"))
    lr: float = _opt(1e-3, "peak learning rate", low=0.0, low_open=True)
    weight_decay: float = _opt(1e-6, "weight decay", low=0.0)
    momentum: float = _opt(0.9, "sgd momentum", low=0.0, high=1.0)
    nesterov: bool = _opt(False, "sgd: Nesterov momentum")
    warmup_epochs: float = _opt(0.0, "linear warm-up length in epochs (per step)", low=0.0)
    schedule: str = _opt(
        "cosine",
        "learning-rate schedule after warm-up; step: x0.1 from epochs int(0.68 E) and "
        "int(0.83 E) of E (the Ring authors' MoCoLRScheduler)",
        choices=("cosine", "constant", "step"),
    )
    min_lr: float = _opt(0.0, "learning rate at the end of the cosine schedule", low=0.0)
    grad_clip: float | None = _opt(
        None, "clip the gradient norm to this value", low=0.0, low_open=True
    )


@dataclass
class TrainSection:
    epochs: int = _opt(20, "number of epochs", low=1)
    batch_size: int = _opt(256, "global batch size (split over the ranks)", low=2)
    num_workers: int = _opt(0, "unused: data are in-memory tensors indexed on the device", low=0)
    threads: int | None = _opt(
        None, "CPU intra-op threads, process-wide (None = torch's default)", low=1
    )
    precision: str = _opt(
        "auto",
        "auto (bf16 on CUDA, else fp32) | fp32 | bf16 | fp16",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    channels_last: bool | str = _opt(
        "auto", "channels-last memory format (auto = CUDA images)", choices=("auto", True, False)
    )
    device: str = _opt("auto", "auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps")
    diagnostics_every: int = _opt(10, "negative diagnostics every N steps (0 = never)", low=0)
    knn_every: int = _opt(5, "kNN monitor every N epochs and at the end (0 = at the end)", low=0)
    checkpoint_every: int = _opt(1, "checkpoints/last.pt every N epochs (0 = at the end)", low=0)
    checkpoint_every_steps: int = _opt(0, "also every N optimizer steps (0 = off)", low=0)
    log_every: int = _opt(10, "TensorBoard scalars every N steps", low=1)
    sync_bn: bool = _opt(
        False,
        "torchrun on GPUs: SyncBatchNorm (BN over the global batch); no effect in one process",
    )
    nonfinite: str = _opt(
        "stop", "on a NaN/Inf loss or embedding: stop | skip the step", choices=("stop", "skip")
    )


@dataclass
class EvalConfig:
    knn: bool = _opt(True, "run the kNN monitor")
    knn_k: int = _opt(200, "neighbours of the weighted kNN", low=1)
    knn_temperature: float = _opt(
        0.1, "temperature of the kNN weights exp(s/t)", low=0.0, low_open=True
    )
    batch_size: int = _opt(512, "batch size of feature extraction", low=1)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "augment": AugmentConfig,
    "model": ModelConfig,
    "framework": FrameworkConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "train": TrainSection,
    "eval": EvalConfig,
}
# sections whose extra keys are free-form parameters of something built by name
_FREE_FORM = {"loss": "params", "augment": "params"}


@dataclass
class TrainConfig:
    """The whole training configuration (see the module docstring for the YAML shape)."""

    seed: int = _opt(0, "random seed (model init, data order, augmentations, draws)", low=0)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    framework: FrameworkConfig = field(default_factory=FrameworkConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict in the YAML shape (loss / augment parameters flattened)."""
        out: dict[str, Any] = {"seed": self.seed}
        for name in SECTIONS:
            section = dataclasses.asdict(getattr(self, name))
            if name in _FREE_FORM:
                section.update(section.pop(_FREE_FORM[name]))
            out[name] = section
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """Build and validate a config from a nested dict (missing keys take their defaults)."""
        return _build(raw)


# ---------------------------------------------------------------------------------------------
# loading


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` and ``5E+2`` as numbers as YAML 1.2 does: YAML 1.1
    wants a dot in a float (``1.0e-3``), so plain PyYAML hands ``loss.temperature=1e-2`` to the
    loss as the string ``'1e-2'``, which it then refuses as not a number. A key given twice in
    one mapping is an error (YAML 1.2 forbids it): PyYAML kept the last silently, so a second
    ``train:`` section at the end of a file dropped every key of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # a list as a key: the base constructor reports it, in YAML's words
            if key in seen:
                first = seen[key].start_mark
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"the key {key!r} is given twice (first at line {first.line + 1}); the "
                    "second would replace the first: merge them",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: Any) -> Any:
    """``yaml.safe_load`` of ``text`` (a string or a file) with ``1e-3`` read as a float."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def _yaml_problem(err: yaml.YAMLError) -> str:
    """``" at line 2, column 1: <problem>"``: PyYAML's message in one line (its own spans
    several, with the file name again and a caret under a copy of the line)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return f": {' '.join(str(err).split())}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def list_configs() -> list[str]:
    """Names of the configs shipped with the package (``hardneg train --config NAME``)."""
    root = importlib.resources.files("hardneg") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(path_or_name: str | Path) -> Path:
    """A path to an existing file, or the packaged config of that name (``.yaml`` optional)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    packaged = Path(str(importlib.resources.files("hardneg") / "configs" / f"{name}.yaml"))
    if packaged.is_file() and path.parent == Path("."):
        return packaged
    close = difflib.get_close_matches(name, list_configs(), n=1)
    hint = f"; did you mean the packaged config {close[0]!r}?" if close else ""
    raise FileNotFoundError(
        f"config {str(path_or_name)!r} is neither a file nor a packaged config{hint} "
        f"(packaged: {', '.join(list_configs())})"
    )


def load_config(
    path: str | Path | dict[str, Any] | None, overrides: typing.Iterable[str] = ()
) -> TrainConfig:
    """Read a YAML config (path or packaged name; None = defaults) and apply overrides.

    Args:
        path: YAML file, packaged config name (see :func:`list_configs`), a dict in the YAML
            shape (e.g. the config stored in a checkpoint), or None for the defaults.
        overrides: ``"section.key=value"`` strings; values are parsed as YAML
            (``train.epochs=5``, ``loss.beta=0.5``, ``framework.symmetric=true``). A dict value
            given for ``loss`` replaces the whole loss section (``'loss={name: ring}'``).

    Raises:
        ValueError: unknown key (with the closest valid one), wrong type or range, or loss
            hyper-parameters that :func:`hardneg.create_loss` rejects.
        FileNotFoundError: ``path`` is neither a file nor a packaged config.
    """
    raw: dict[str, Any] = {}
    if isinstance(path, dict):
        raw = copy.deepcopy(path)
    elif path is not None:
        file = resolve_config_path(path)
        with open(file, encoding="utf-8") as fh, utf8_file(file):
            try:
                raw = load_yaml(fh) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"{file}: not valid YAML{_yaml_problem(err)}") from None
        if not isinstance(raw, dict):
            raise ValueError(
                f"{file}: a config must be a mapping of sections, got {type(raw).__name__}"
            )
    empty_file = path is not None and not isinstance(path, dict) and not raw
    for item in overrides:
        apply_override(raw, item)
    try:
        return _build(raw)
    except ValueError as err:
        if empty_file:  # every key took its default: say so
            raise ValueError(
                f"config {path} is empty, so every key has its default: {err}"
            ) from None
        raise


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b=value`` override (value parsed as YAML) to a raw nested dict in place."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(
            f"override {item!r} must look like section.key=value (e.g. train.epochs=5)"
        )
    try:
        value = load_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in SECTIONS and isinstance(value, dict):
        if parts[0] == "loss":
            raw["loss"] = value
        else:
            raw.setdefault(parts[0], {}).update(value)
        return
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# validation


def _build(raw: dict[str, Any]) -> TrainConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    top_keys = [f.name for f in dataclasses.fields(TrainConfig)]
    _reject_unknown(raw, top_keys, prefix="")
    kwargs: dict[str, Any] = {}
    if "seed" in raw:
        kwargs["seed"] = _check_field("seed", _field(TrainConfig, "seed"), raw["seed"])
    for name, cls in SECTIONS.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{name} must be a section (a mapping of keys), got {section!r}")
        kwargs[name] = _build_section(name, cls, section)
    config = TrainConfig(**kwargs)
    _check_combinations(config)
    config.loss.params = resolved_loss_params(config.loss.name, config.loss.params)
    return config


# runtime switches of a loss, not hyper-parameters: left out of the resolved loss section
_LOSS_SWITCHES = ("check_inputs",)


def resolved_loss_params(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """Every hyper-parameter of loss ``name``: the registry defaults
    (:func:`hardneg.loss_hparams`) updated with ``given``, in the registry's order, so a run's
    ``config.yaml`` states them all. Runtime switches (``check_inputs``) stay out unless given."""
    from hardneg.registry import loss_hparams

    defaults = {k: v for k, v in loss_hparams(name).items() if k not in _LOSS_SWITCHES}
    return {**defaults, **given}


def _build_section(name: str, cls: type, section: dict[str, Any]) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    section = dict(section)
    if name in _FREE_FORM:
        free = _FREE_FORM[name]
        if free in section:  # also accept the nested form produced by dataclasses.asdict
            section.update(section.pop(free) or {})
        params = {k: section.pop(k) for k in list(section) if k not in names}
        section[free] = params
    _reject_unknown(section, names, prefix=f"{name}.")
    values = {k: _check_field(f"{name}.{k}", _field(cls, k), v) for k, v in section.items()}
    return cls(**values)


def _reject_unknown(given: dict[str, Any], valid: list[str], prefix: str) -> None:
    for key in given:
        if key not in valid:
            homes = where_is(str(key)) if not prefix else []
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            if homes:  # a section's key given at the top level: temperature -> loss.temperature
                hint = f"; did you mean {' or '.join(homes)}?"
            else:
                hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ValueError(
                f"unknown config key {prefix}{key}{hint} (valid keys"
                f"{' in ' + prefix[:-1] if prefix else ''}: {', '.join(valid)})"
            )


def where_is(key: str) -> list[str]:
    """The dotted names a bare ``key`` has in the config: ``temperature`` -> ``loss.temperature``,
    ``epochs`` -> ``train.epochs``, ``batch_size`` -> ``train.batch_size``, ``eval.batch_size``."""
    from hardneg.registry import list_losses, loss_hparams

    homes = [
        f"{name}.{key}"
        for name, cls in SECTIONS.items()
        if key in {f.name for f in dataclasses.fields(cls)} and key != _FREE_FORM.get(name)
    ]
    if f"loss.{key}" not in homes and any(key in loss_hparams(n) for n in list_losses()):
        homes.append(f"loss.{key}")
    return sorted(homes, key=lambda h: (not h.startswith("train."), h))


def _field(cls: type, name: str) -> tuple[dataclasses.Field[Any], Any]:
    hints = typing.get_type_hints(cls)
    return next(f for f in dataclasses.fields(cls) if f.name == name), hints[name]


def _type_options(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _describe(options: tuple[Any, ...]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        type(None): "null",
    }
    return " or ".join(names.get(typing.get_origin(o) or o, "a mapping") for o in options)


def _check_field(key: str, spec: tuple[dataclasses.Field[Any], Any], value: Any) -> Any:
    fld, hint = spec
    meta = fld.metadata
    options = _type_options(hint)
    value = _coerce(value, options)
    if value is None:
        if type(None) not in options:
            raise ValueError(f"{key} must be {_describe(options)}, got null")
        return None
    choices = meta.get("choices")
    if choices is not None:
        if not isinstance(value, (str, bool)) or value not in choices:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if not any(_is_type(value, o) for o in options):
        raise ValueError(
            f"{key} must be {_describe(options)}, got {value!r} ({type(value).__name__})"
        )
    if isinstance(value, str) and str in options and int in options:
        if value != "all":  # the only string allowed beside an integer (bank_negatives)
            raise ValueError(f"{key} must be an integer or 'all', got {value!r}")
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{key} must be finite, got {value!r}")
        low, high = meta.get("low"), meta.get("high")
        if low is not None and (value < low or (meta.get("low_open") and value == low)):
            op = ">" if meta.get("low_open") else ">="
            raise ValueError(f"{key} must be {op} {low:g}, got {value!r}")
        if high is not None and value > high:
            raise ValueError(f"{key} must be <= {high:g}, got {value!r}")
    return value


def _coerce(value: Any, options: tuple[Any, ...]) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string and ``256.0`` as a float: accept both where sensible."""
    if isinstance(value, str) and float in options:
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and float in options:
        return float(value)
    if isinstance(value, float) and int in options and float not in options and value.is_integer():
        return int(value)
    return value


def _is_type(value: Any, option: Any) -> bool:
    origin = typing.get_origin(option) or option
    if origin is bool:
        return isinstance(value, bool)
    if origin in (int, float):
        return isinstance(value, origin) and not isinstance(value, bool)
    if origin is dict:
        return isinstance(value, dict)
    return origin is not type(None) and isinstance(value, origin)


def _check_combinations(config: TrainConfig) -> None:
    """Checks that need several keys or another module's registry (all cheap, no data)."""
    from hardneg.registry import create_loss

    _check_loss_keys(config.loss)
    try:
        create_loss(config.loss.name, **config.loss.params)
    except (ValueError, TypeError) as err:
        raise ValueError(f"loss: {err}") from None
    from hardneg.augment import build_augmentation
    from hardneg.data import dataset_info
    from hardneg.models import BACKBONES, HEADS

    try:
        info = dataset_info(config.data.dataset)
    except (ValueError, KeyError) as err:
        raise ValueError(f"data.dataset: {err}") from None
    if config.data.split is not None and config.data.split not in info.splits:
        raise ValueError(
            f"data.split must be one of {', '.join(info.splits)} for {info.name}, "
            f"got {config.data.split!r}"
        )
    try:  # builds a small module only; checks the recipe and every augment.* key
        build_augmentation(
            config.data.dataset,
            config.data.image_size,
            config.augment.recipe,
            **config.augment.params,
        )
    except (ValueError, TypeError) as err:
        raise ValueError(f"augment: {err}") from None

    for key, value, allowed in (
        ("model.backbone", config.model.backbone, ("auto", *BACKBONES)),
        ("model.head", config.model.head, HEADS),
    ):
        if value not in allowed:
            hint = closest_hint(value, list(allowed))
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}{hint}")
    if config.model.backbone == "auto":  # resolved here, so config.yaml names the encoder
        config.model.backbone = default_backbone(info)
    _check_backbone_fits_data(config.model.backbone, info)
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", config.train.device):
        raise ValueError(
            f"train.device must be auto, cpu, mps, cuda or cuda:N, got {config.train.device!r}"
        )
    _check_views(config, info)
    if config.framework.name == "memory_bank" and config.framework.symmetric:
        raise ValueError("framework.symmetric applies to moco only (memory_bank uses one view)")
    for key in ("predictor", "shuffle_bn"):
        if config.framework.name != "moco" and getattr(config.framework, key) is True:
            raise ValueError(
                f"framework.{key} applies to moco only, "
                f"got framework.name={config.framework.name!r}"
            )
    splits = config.framework.bn_splits
    if splits != 1 and config.framework.name != "moco":
        raise ValueError(
            f"framework.bn_splits applies to moco only, got framework.name={config.framework.name!r}"
            " (a MoCo config switched to another framework: add framework.bn_splits=1)"
        )
    if splits > 1 and config.train.sync_bn:
        raise ValueError(
            f"framework.bn_splits={splits} and train.sync_bn=true contradict each other: "
            "SyncBatchNorm normalises over the whole global batch; choose one"
        )
    if splits > 1 and config.train.batch_size < 2 * splits:
        raise ValueError(
            f"framework.bn_splits={splits} leaves fewer than 2 rows per batch-norm group at "
            f"train.batch_size={config.train.batch_size} (a head's BatchNorm1d needs 2)"
        )
    if config.train.batch_size % splits:
        raise ValueError(
            f"framework.bn_splits={splits} must divide train.batch_size={config.train.batch_size} "
            "(each batch-norm group gets an equal share of the batch): set it to a divisor, "
            "or 1 for plain batch norm"
        )


def _check_views(config: TrainConfig, info: Any) -> None:
    """``framework.views`` / ``small_crops`` (SimCLR's several positives, multi-crop)."""
    fw, aug = config.framework, config.augment
    extra = fw.views != 2 or fw.small_crops > 0
    if extra and fw.name != "simclr":
        raise ValueError(
            f"framework.views and framework.small_crops apply to simclr only, got "
            f"framework.name={fw.name!r} (moco and memory_bank contrast one query with its key)"
        )
    if fw.small_crops > 0 and info.kind != "image":
        raise ValueError(
            f"framework.small_crops makes low-resolution crops of images; {config.data.dataset} "
            f"holds {info.kind}s: use framework.views for more full-size views"
        )
    if fw.small_crops == 0:  # the small crops' settings would go unused, silently
        defaults = AugmentConfig()
        for key in ("small_size", "small_scale_min", "small_scale_max"):
            if getattr(aug, key) != getattr(defaults, key):
                raise ValueError(
                    f"augment.{key} sets the small crops, which need framework.small_crops > 0, "
                    "got 0"
                )
    if aug.small_scale_min >= aug.small_scale_max:
        raise ValueError(
            f"augment.small_scale_min ({aug.small_scale_min}) must be below "
            f"augment.small_scale_max ({aug.small_scale_max})"
        )
    if extra:
        from hardneg.registry import strategy_class

        kind = strategy_class(config.loss.name).feature_kind
        if kind is not None:
            raise ValueError(
                f"loss {config.loss.name!r} reads the {kind} features of exactly two views; "
                f"framework.views={fw.views} with framework.small_crops={fw.small_crops} gives "
                f"{fw.views + fw.small_crops}: keep framework.views=2 and framework.small_crops=0 "
                f"(hardneg compare: leave {config.loss.name!r} out of --strategies)"
            )


def _check_loss_keys(loss: LossConfig) -> None:
    """Keys of another loss left in the loss section (``loss.name=ring`` on an HCL config keeps
    ``tau_plus``): say so, and how to replace the whole section."""
    from hardneg.registry import list_losses, loss_hparams

    try:
        allowed = loss_hparams(loss.name)
    except ValueError as err:  # an unknown name, with a suggestion
        raise ValueError(f"loss: {err}") from None
    others = {k for n in list_losses() if n != loss.name for k in loss_hparams(n)}
    leftover = [k for k in loss.params if k not in allowed and k in others]
    if not leftover:
        return  # a typo gets create_loss's "did you mean" message
    keep = {k: v for k, v in loss.params.items() if k in allowed and k not in _LOSS_SWITCHES}
    section = ", ".join([f"name: {loss.name}", *(f"{k}: {v}" for k, v in keep.items())])
    names = ", ".join(k for k in allowed if k not in _LOSS_SWITCHES)
    raise ValueError(
        f"loss: {loss.name!r} has no hyper-parameter {', '.join(map(repr, leftover))} (left in the "
        f"loss section by another loss); to switch losses replace the whole section, e.g. "
        f"'loss={{{section}}}' ({loss.name} takes: {names})"
    )


# which encoders read which kind of data set (hardneg.data.DatasetInfo.kind)
BACKBONES_FOR_KIND = {
    "signal": ("cnn1d",),
    "image": ("resnet18", "resnet50", "digits_cnn"),
}


def _backbones_for(info: Any) -> tuple[str, ...]:
    """The encoders that read data set ``info``, its default first."""
    allowed = BACKBONES_FOR_KIND.get(info.kind, ())
    if info.image_size is not None and info.image_size < 32 and "digits_cnn" in allowed:
        allowed = ("digits_cnn", *(a for a in allowed if a != "digits_cnn"))  # 8 px digits
    return allowed


def default_backbone(info: Any) -> str:
    """``model.backbone: auto`` for data set ``info`` (cnn1d, digits_cnn or resnet18)."""
    allowed = _backbones_for(info)
    return allowed[0] if allowed else "resnet18"


def _check_backbone_fits_data(backbone: str, info: Any) -> None:
    allowed = _backbones_for(info)
    if not allowed or backbone in allowed:
        return
    what = "1-D signals" if info.kind == "signal" else "images"
    raise ValueError(
        f"model.backbone={backbone!r} does not fit data set {info.name!r}, which holds "
        f"{what}; allowed for {info.name}: {', '.join(allowed)} "
        f"(e.g. model.backbone={allowed[0]}, or model.backbone=auto)"
    )
