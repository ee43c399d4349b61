"""``hardneg compare`` on a graph config: strategies (and betas) x repeats, HCL's SVM protocol.

``hardneg compare --config mutag --data-dir /path/to/TU`` runs what
:mod:`hardneg.graph.protocol` runs (InfoGraph, HCL's ``JSD_hard``, ``beta`` in the config's
``betas``, the config's repeats and epochs, the 10-fold RBF-SVM protocol) and, with
``--strategies``, any other registered strategy on the same node-graph pairs. Which strategies
take the ``beta`` sweep is read from the registry: every requested strategy whose
hyper-parameters include ``beta`` runs once per ``beta`` (``STRATEGY.beta=X`` pins one value);
the others run once with their registry defaults. The config's ``objective`` (``jsd_hard``) goes
to the strategies that support it (``hcl``); the others train on InfoGraph's Jensen-Shannon
objective (``objective=infonce`` as an override puts every strategy on InfoNCE).

Run ``r`` of every setting uses the seed ``1000 r + int(10 beta)`` (``beta`` 0 for strategies
without one), as the protocol does, so ``hcl`` rows reproduce ``python -m hardneg.graph.protocol``
run for run. Each finished run is saved as ``<out>/<setting>/repeat<r>.json`` and reused when the
comparison is run again with the same settings and the same TU files (their SHA-256 is saved
with each run; an interrupted comparison continues where it stopped); ``report.md`` and
``results.json`` in ``--out`` hold the table and every run.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hardneg.config import load_yaml
from hardneg.graph.protocol import (
    CONFIG_KEYS,
    build_model,
    check_graph_config,
    degree_option,
    load_graph_config,
    published_figure,
    run_seed,
    train_and_score,
)

log = logging.getLogger(__name__)
RESULT_KEYS = ("svm", "svm_std", "train_s", "loss")


@dataclass(frozen=True)
class GraphSetting:
    """One row of the table: a strategy, its ``beta`` (None: the strategy has none), the
    objective it trains on and its other hyper-parameters."""

    strategy: str
    beta: float | None
    objective: str
    hparams: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return self.strategy if self.beta is None else f"{self.strategy} beta={self.beta:g}"

    @property
    def folder(self) -> str:
        return self.strategy if self.beta is None else f"{self.strategy}-beta{self.beta:g}"

    def loss_hparams(self) -> dict[str, Any]:
        out = dict(self.hparams)
        if self.beta is not None:
            out["beta"] = self.beta
        return out


@dataclass
class GraphOutcome:
    rows: list[dict]  # one per setting: label, strategy, beta, objective, accuracies, mean, std
    runs: list[dict]  # one per finished run
    failed: list[str]
    table: str
    report: Path
    seconds: float
    notes: list[str] = field(default_factory=list)


def parse_value(text: str) -> Any:
    """``'2'`` -> 2, ``'[0, 1]'`` -> [0, 1], ``'0,1,2'`` -> [0, 1, 2], other text unchanged."""
    if "," in text and not text.strip().startswith("["):
        return [load_yaml(t) for t in text.split(",") if t.strip()]
    return load_yaml(text)  # 1e-2 is a number, as in the image configs


def apply_overrides(
    cfg: dict, overrides: Sequence[str], strategies: Sequence[str]
) -> tuple[dict, dict[str, Any], dict[str, dict[str, Any]], str | None]:
    """Sort ``key=value`` overrides: config keys (``epochs=50``, ``betas=0,2``), ``loss.KEY``
    (every strategy that has KEY), ``STRATEGY.KEY`` (one strategy), ``data.data_dir``.

    Returns ``(config, loss-wide hparams, per-strategy hparams, data_dir or None)``.
    """
    from hardneg.registry import list_losses

    cfg = dict(cfg)
    loss_wide: dict[str, Any] = {}
    per_strategy: dict[str, dict[str, Any]] = {}
    data_dir = None
    registered = list_losses()
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        head, _, rest = key.partition(".")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        if key == "data.data_dir":
            data_dir = value
        elif key in CONFIG_KEYS and key not in ("dataset", "framework", "loss", "published"):
            cfg[key] = parse_value(value)
            if key == "betas" and isinstance(cfg[key], (int, float)):
                cfg[key] = [cfg[key]]  # betas=2
        elif head == "loss" and rest:
            loss_wide[rest] = parse_value(value)
        elif head in registered and rest:
            if head not in strategies:
                raise ValueError(f"override {item!r}: {head!r} is not among --strategies")
            per_strategy.setdefault(head, {})[rest] = parse_value(value)
        else:
            allowed = sorted(CONFIG_KEYS - {"dataset", "framework", "loss", "published"})
            raise ValueError(
                f"graph override {item!r}: use one of {', '.join(allowed)}, data.data_dir, "
                "loss.KEY (every strategy that has KEY) or STRATEGY.KEY (e.g. hcl.tau_plus=0.1)"
            )
    return check_graph_config(cfg), loss_wide, per_strategy, data_dir


def plan_settings(
    cfg: dict,
    strategies: Sequence[str],
    loss_wide: dict[str, Any] | None = None,
    per_strategy: dict[str, dict[str, Any]] | None = None,
) -> list[GraphSetting]:
    """The table's rows, in the order of ``strategies``; ``beta`` sweeps are read from the
    registry (a strategy whose hyper-parameters include ``beta``)."""
    from hardneg.registry import loss_hparams, strategy_class

    loss_wide, per_strategy = loss_wide or {}, per_strategy or {}
    settings = []
    for name in strategies:
        defaults = loss_hparams(name)  # unknown names fail here, with a suggestion
        hp = {k: v for k, v in loss_wide.items() if k in defaults}
        hp.update(per_strategy.get(name, {}))
        wanted = cfg.get("objective") or "jsd_hard"
        supports_jsd_hard = hasattr(strategy_class(name), "current_beta")
        objective = "jsd" if wanted == "jsd_hard" and not supports_jsd_hard else wanted
        if "beta" in defaults and "beta" not in hp:
            betas: list[float | None] = list(cfg["betas"])
        else:
            betas = [float(hp.pop("beta"))] if "beta" in hp else [None]
        frozen = tuple(sorted(hp.items()))
        settings += [GraphSetting(name, b, objective, frozen) for b in betas]
    return settings


def run_settings(
    cfg: dict, setting: GraphSetting, repeat: int, data_sha256: str | None = None
) -> dict[str, Any]:
    """Everything that decides a run's result (saved with it, compared before reuse);
    ``data_sha256``: the TU files' digest, so a run is not reused on edited or other data."""
    keys = ("dataset", "epochs", "batch_size", "lr", "hidden", "num_layers", "svm_folds")
    return {
        **{k: cfg.get(k) for k in keys},
        **({"data_sha256": data_sha256} if data_sha256 else {}),
        "direction": cfg.get("direction", "authors"),
        "strategy": setting.strategy,
        "beta": setting.beta,
        "objective": setting.objective,
        "hparams": {k: v for k, v in setting.hparams},
        "repeat": repeat,
        "seed": run_seed(repeat, setting.beta),
    }


def _load_run(path: Path, expected: dict) -> dict | None:
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    stored, wanted = saved.get("settings") or {}, json.loads(json.dumps(expected))
    if "data_sha256" not in stored:  # a run saved before the digest was recorded
        wanted.pop("data_sha256", None)
    if stored != wanted:
        other_data = stored.get("data_sha256") != wanted.get("data_sha256")
        raise ValueError(
            f"{path} holds a run with other settings"
            + (" (trained on other data files)" if other_data else "")
            + "; choose another --out (or delete it)"
        )
    return saved


def check_out_folder(out: Path, settings: Sequence[GraphSetting], repeats: int) -> None:
    """Refuse an ``out`` folder holding runs this comparison does not plan (its report would
    silently drop them)."""
    planned = {(s.folder, f"repeat{r}.json") for s in settings for r in range(repeats)}
    extra = sorted(
        f"{p.parent.name}/{p.name}"
        for p in out.glob("*/repeat*.json")
        if (p.parent.name, p.name) not in planned
    )
    if extra:
        raise ValueError(
            f"--out {out} already holds runs that this comparison does not include "
            f"({', '.join(extra[:6])}{'...' if len(extra) > 6 else ''}); choose a new --out"
        )


def summarize_rows(settings: Sequence[GraphSetting], runs: Sequence[dict]) -> list[dict]:
    rows = []
    for s in settings:
        accs = [r["svm"] for r in runs if r["setting"] == s.label]
        rows.append(
            {
                "label": s.label,
                "strategy": s.strategy,
                "beta": s.beta,
                "objective": s.objective,
                "accuracies": accs,
                "mean": statistics.mean(accs) if accs else None,
                "std": statistics.stdev(accs) if len(accs) > 1 else (0.0 if accs else None),
            }
        )
    return rows


def format_graph_table(cfg: dict, rows: Sequence[dict]) -> str:
    published = cfg.get("published") or {}
    own = cfg.get("loss", "hcl")
    lines = [
        f"| strategy | beta | objective | {cfg['dataset']} SVM accuracy (%), mean ± std "
        "| repeats | published |",
        "|---|---:|---|---:|---:|---|",
    ]
    for row in rows:
        beta = "" if row["beta"] is None else f"{row['beta']:g}"
        if row["mean"] is None:
            acc = "no finished run"
        elif len(row["accuracies"]) == 1:
            acc = f"{row['mean']:.2f} (one run, no std)"
        else:
            acc = f"{row['mean']:.2f} ± {row['std']:.2f}"
        lines.append(
            f"| {row['strategy']} | {beta} | {row['objective']} | {acc} | "
            f"{len(row['accuracies'])} | {published_figure(row, published, own)} |"
        )
    return "\n".join(lines)


def compare_graphs(
    config: str | Path,
    *,
    strategies: Sequence[str] | None,
    data_dir: str | Path | None,
    out: str | Path,
    repeats: int | None = None,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    command: str | None = None,
    threads: int = 1,
    say: Callable[[str], None] = print,
) -> GraphOutcome:
    """Train and score every setting x repeat of a graph config; write the report.

    ``strategies`` None: the config's ``loss`` (``hcl``: HCL's protocol). Everything is checked
    (config, overrides, strategies, data folder, every model against the data) before the first
    run starts.
    """
    import torch

    from hardneg.graph.data import load_tu
    from hardneg.graph.evaluate import check_scorable
    from hardneg.graph.train import check_model_data

    cfg = load_graph_config(str(config))
    strategies = list(strategies) if strategies else [cfg.get("loss", "hcl")]
    if len(set(strategies)) != len(strategies):
        raise ValueError(f"--strategies lists a strategy twice: {','.join(strategies)}")
    cfg, loss_wide, per_strategy, override_dir = apply_overrides(cfg, overrides, strategies)
    if epochs is not None:
        cfg["epochs"] = epochs
    if repeats is not None:
        cfg["repeats"] = repeats
    cfg = check_graph_config(cfg)
    data_dir = data_dir or override_dir
    if not data_dir:
        raise ValueError(
            f"a graph comparison needs the TU data folder: --data-dir DIR (DIR/{cfg['dataset']}"
            f"/raw/ holds {cfg['dataset']}_A.txt etc.)"
        )
    settings = plan_settings(cfg, strategies, loss_wide, per_strategy)
    data = load_tu(data_dir, cfg["dataset"], degree=degree_option(cfg))
    check_scorable(data.labels.numpy(), repr(cfg["dataset"]))  # else it fails after training
    for s in settings:  # every model is built and checked against the data before training
        model = build_model(
            cfg, data, loss=s.strategy, loss_hparams=s.loss_hparams(), objective=s.objective
        )
        check_model_data(model, data, int(cfg.get("batch_size", 128)))
    out = Path(out)
    check_out_folder(out, settings, int(cfg["repeats"]))

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    start = time.perf_counter()
    runs: list[dict] = []
    failed: list[str] = []
    total = len(settings) * int(cfg["repeats"])
    try:
        i = 0
        for r in range(int(cfg["repeats"])):  # repeat-major: an interruption leaves whole repeats
            for s in settings:
                i += 1
                tag = f"[{i}/{total}] {s.label} repeat {r + 1}"
                expected = run_settings(cfg, s, r, data.info.get("files_sha256"))
                path = out / s.folder / f"repeat{r}.json"
                saved = _load_run(path, expected)
                if saved is None:
                    try:
                        result = train_and_score(
                            cfg,
                            data,
                            loss=s.strategy,
                            loss_hparams=s.loss_hparams(),
                            objective=s.objective,
                            seed=expected["seed"],
                        )
                    except FloatingPointError as err:
                        failed.append(f"{s.label} repeat {r + 1}: {err}")
                        log.warning(f"{tag}: FAILED ({err})")  # shown with --quiet too
                        continue
                    saved = {"settings": expected, **{k: result[k] for k in RESULT_KEYS}}
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(saved, indent=2))
                    how = f"train {result['train_s']:.1f} s"
                else:
                    how = "reused"
                runs.append(
                    {"setting": s.label, "repeat": r, "seed": expected["seed"], "file": str(path),
                     **{k: saved[k] for k in RESULT_KEYS}}
                )  # fmt: skip
                say(f"{tag}: {saved['svm']:.2f}% ({how})")
    finally:
        torch.set_num_threads(previous_threads)
    seconds = time.perf_counter() - start
    rows = summarize_rows(settings, runs)
    table = format_graph_table(cfg, rows)
    notes = graph_notes(cfg, settings)
    report = write_graph_report(out, cfg, rows, runs, table, notes, failed, command, seconds)
    return GraphOutcome(rows, runs, failed, table, report, seconds, notes)


def graph_notes(cfg: dict, settings: Sequence[GraphSetting]) -> list[str]:
    published = cfg.get("published") or {}
    notes = [
        f"InfoGraph (GIN {cfg.get('num_layers', 3)} x {cfg.get('hidden', 32)}, two FF heads), "
        f"{cfg['epochs']} epochs, batch {cfg.get('batch_size', 128)}, Adam lr "
        f"{cfg.get('lr', 1e-3)}, graphs shuffled once per run; direction "
        f"{cfg.get('direction', 'authors')!r} for jsd_hard",
        f"accuracy: RBF SVM, C in {{1e-3, ..., 1e3}} by 5-fold grid search inside "
        f"{cfg.get('svm_folds', 10)}-fold stratified CV (mean over the folds); mean ± std over "
        "repeats (sample std)",
        "run r of every setting has seed 1000 r + int(10 beta) (beta 0 for strategies without "
        "one): the same shuffle and initialisation across strategies",
    ]
    if published:
        notes.append(f"published: {published.get('source', '')}")
        if published.get("note"):
            notes.append(str(published["note"]))
    return notes


def write_graph_report(
    out: Path,
    cfg: dict,
    rows: Sequence[dict],
    runs: Sequence[dict],
    table: str,
    notes: Sequence[str],
    failed: Sequence[str],
    command: str | None,
    seconds: float,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"config": cfg, "rows": list(rows), "runs": list(runs),
                    "failed": list(failed), "seconds": seconds, "command": command}, indent=2)
    )  # fmt: skip
    per_run = [
        "| setting | repeat | seed | SVM accuracy (%) | train (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    per_run += [
        f"| {r['setting']} | {r['repeat'] + 1} | {r['seed']} | {r['svm']:.2f} | {r['train_s']:.1f} |"
        for r in runs
    ]
    text = [
        f"# hardneg compare: {cfg['dataset']} (graph protocol)",
        "",
        *([f"Command: `{command}`", ""] if command else []),
        f"{len(runs)} runs in {seconds:.0f} s (reused runs count 0 s); {os.cpu_count()} CPU cores.",
        "",
        table,
        "",
        *(f"- {n}" for n in notes),
        *(f"- FAILED: {f}" for f in failed),
        "",
        "## Every run",
        "",
        *per_run,
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(text))
    return report
