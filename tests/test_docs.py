"""The documentation stays in sync with the code: every built-in loss is described in
docs/methods.md with each hyper-parameter and its default, has rows in docs/deviations.md, and is
listed in the README's method table with the status the ledger gives it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import hardneg
from hardneg.registry import strategy_class

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
DEVIATIONS = ROOT / "docs" / "deviations.md"
README = ROOT / "README.md"

# documented before their strategy is registered (being ported); checked like the others once
# they are registered
PENDING: set[str] = set()
PENDING_PATHS: set[str] = set()


def builtin_losses() -> list[str]:
    """Registered losses defined inside the package (strategies registered by tests or
    plug-ins from other modules are not documented here)."""
    return [n for n in hardneg.list_losses() if strategy_class(n).__module__.startswith("hardneg.")]


def table_rows(text: str, header: str) -> list[list[str]]:
    """Cells of the Markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header)]
    if not starts:
        return []
    rows = []
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def unquote(cell: str) -> str:
    m = re.fullmatch(r"`([^`]*)`", cell)
    return m.group(1) if m else cell


def doc_defaults(text: str) -> dict[str, dict[str, str]]:
    """``{loss: {hyper-parameter: repr of the default}}`` from methods.md's defaults table."""
    out: dict[str, dict[str, str]] = {}
    for row in table_rows(text, "| loss | hyper-parameter | default |"):
        loss, name, default = (unquote(c) for c in row[:3])
        out.setdefault(loss, {})[name] = default
    return out


def defaults_problems(name: str, hparams: dict, documented: dict[str, dict[str, str]]) -> list[str]:
    rows = documented.get(name)
    if rows is None:
        return [f"{name}: no rows in the defaults table of docs/methods.md"]
    problems = []
    for key, value in hparams.items():
        if key not in rows:
            problems.append(f"{name}.{key} (default {value!r}) is not documented")
        elif rows[key] != repr(value):
            problems.append(f"{name}.{key}: documented {rows[key]}, code {value!r}")
    for key in rows.keys() - hparams.keys():
        problems.append(f"{name}.{key} is documented but is not a hyper-parameter")
    return problems


def ledger_status(text: str) -> dict[str, str]:
    return {unquote(r[0]): r[1] for r in table_rows(text, "| loss | status | rows |")}


def ledger_losses(text: str) -> set[str]:
    """Loss names in the ``loss`` column of the ledger's deviation tables."""
    names: set[str] = set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| D-") and len(cells) >= 7:
            names.update(re.findall(r"`([a-z_][a-z0-9_]*)`", cells[1]))
    return names


def readme_methods(text: str) -> dict[str, str]:
    """``{loss: status cell}`` of the README's method table."""
    return {
        unquote(r[0]): r[-1].replace("*", "").strip()
        for r in table_rows(text, "| name (`create_loss`)")
    }


@pytest.fixture(scope="module")
def methods() -> str:
    return METHODS.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def deviations() -> str:
    return DEVIATIONS.read_text(encoding="utf-8")


def test_the_builtin_losses_include_the_documented_core():
    # guards the filter in builtin_losses: a package-side rename would otherwise empty the checks
    assert {"infonce", "debiased", "hcl", "ring", "unremix"} <= set(builtin_losses())


@pytest.mark.parametrize("name", builtin_losses())
def test_methods_md_lists_every_hyper_parameter_and_default_of_each_loss(name, methods):
    assert f"`{name}`" in methods.split("## Defaults")[0], f"{name} has no section in methods.md"
    problems = defaults_problems(name, hardneg.loss_hparams(name), doc_defaults(methods))
    assert not problems, "docs/methods.md is out of date:\n" + "\n".join(problems)


def test_methods_md_documents_no_loss_that_is_not_registered(methods):
    stale = doc_defaults(methods).keys() - set(builtin_losses()) - PENDING
    assert not stale, f"docs/methods.md documents losses that are not registered: {sorted(stale)}"


def test_the_defaults_check_catches_a_missing_a_wrong_and_a_stale_row():
    documented = {"ring": {"rho_out": "0.1", "rho_in": "0.2", "gone": "1"}}
    problems = defaults_problems(
        "ring", {"rho_out": 0.1, "rho_in": 0.1, "num_samples": None}, documented
    )
    assert len(problems) == 3
    assert any("num_samples" in p for p in problems)
    assert any("rho_in" in p and "0.2" in p for p in problems)
    assert any("gone" in p for p in problems)
    assert defaults_problems("hcl", {"beta": 1.0}, documented) == [
        "hcl: no rows in the defaults table of docs/methods.md"
    ]


@pytest.mark.parametrize("name", builtin_losses())
def test_the_deviations_ledger_has_rows_and_a_status_for_each_loss(name, deviations):
    assert name in ledger_losses(deviations), f"docs/deviations.md has no row for {name}"
    assert ledger_status(deviations).get(name) in {"faithful", "reconstruction"}


def test_the_ledger_marks_unremix_as_a_reconstruction(deviations):
    assert ledger_status(deviations)["unremix"] == "reconstruction"


def test_every_ledger_row_names_where_source_what_we_do_why_and_option(deviations):
    ids = []
    for line in deviations.splitlines():
        if line.startswith("| D-"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 7 and all(cells), f"incomplete ledger row: {line[:80]}"
            ids.append(cells[0])
    assert len(ids) == len(set(ids)), "duplicate ledger ids"
    assert len(ids) >= 20


def test_every_deviation_cited_in_methods_md_exists(methods, deviations):
    ids = {
        line.split("|")[1].strip() for line in deviations.splitlines() if line.startswith("| D-")
    }
    cited = set()
    for group in re.findall(r"\[(D-[^\]]+)\]", methods):
        cited.update(x.strip() for x in group.split(","))
    assert cited, "methods.md cites no ledger row"
    assert not cited - ids, f"methods.md cites unknown ledger rows: {sorted(cited - ids)}"


@pytest.mark.parametrize("doc", [METHODS, DEVIATIONS], ids=lambda p: p.name)
def test_docs_name_only_files_that_exist_and_stand_alone(doc):
    text = doc.read_text(encoding="utf-8")
    assert "shared/docs" not in text, "a user's checkout has no shared/ folder"
    paths = set(re.findall(r"`((?:src/hardneg|tests|benchmarks|docs)/[\w./-]*)`", text))
    missing = sorted(p for p in paths - PENDING_PATHS if not (ROOT / p).exists())
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def test_readme_method_table_lists_every_loss_with_the_ledgers_status(deviations):
    text = README.read_text(encoding="utf-8")
    table = readme_methods(text)
    if not table:
        pytest.skip("README has no method table")
    status = ledger_status(deviations)
    missing = [n for n in builtin_losses() if n not in table]
    assert not missing, f"README's method table lacks {missing}"
    for name in builtin_losses():
        assert table[name].startswith(status[name]), (
            f"README says {name} is {table[name]!r}; docs/deviations.md says {status[name]!r}"
        )
    assert "docs/methods.md" in text and "docs/deviations.md" in text


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_s_python_examples_run_as_written():
    """Each self-contained ```python block of the README runs in a fresh interpreter (its own
    registry). The plug-in example is also used once, since its ``select`` runs only then; the
    sentence-transformers fragment (it needs a model) is left out."""
    import subprocess
    import sys

    blocks = [b for b in readme_python_blocks() if "HardNegativeLoss(model" not in b]
    assert len(blocks) >= 3, "the README's quick-start, API and plug-in examples are gone"
    use = {
        "register_strategy(": "\nimport hardneg as _hn, torch as _t\n"
        "_hn.create_loss('top_k_hardest', k=4)(_t.randn(8, 16), _t.randn(8, 16))\n"
    }
    for block in blocks:
        code = block + "".join(extra for key, extra in use.items() if key in block)
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"README example failed:\n{block}\n{done.stderr[-2000:]}"


# framework settings whose class keyword has another name, or whose class default is the
# setting resolved (predictor: a module or None; shuffle_bn: 'auto' resolved by the trainer)
FRAMEWORK_KEYWORDS = {
    ("moco", "momentum"): "momentum",
    ("moco", "queue_size"): "queue_size",
    ("moco", "symmetric"): "symmetric",
    ("moco", "enqueue"): "enqueue",
    ("memory_bank", "bank_momentum"): "momentum",
    ("memory_bank", "bank_negatives"): "negatives",
    ("memory_bank", "bank_draws"): "draws",
}


def doc_framework_defaults(text: str) -> dict[tuple[str, str], str]:
    """``{(framework, setting): repr of the default}`` from methods.md's framework table."""
    return {
        (unquote(r[0]), unquote(r[1])): unquote(r[2])
        for r in table_rows(text, "| framework | setting | default |")
    }


def framework_default_problems(
    documented: dict[tuple[str, str], str], config_defaults: dict[str, object]
) -> list[str]:
    problems = []
    settings = {setting for _, setting in documented}
    for name, value in config_defaults.items():
        if name != "name" and name not in settings:
            problems.append(f"framework.{name} (default {value!r}) is not documented")
    for (_framework, setting), default in documented.items():
        if setting not in config_defaults:
            problems.append(f"framework.{setting} is documented but is not a setting")
        elif default != repr(config_defaults[setting]):
            problems.append(
                f"framework.{setting}: documented {default}, config {config_defaults[setting]!r}"
            )
    return problems


def test_methods_md_lists_every_framework_setting_with_the_configs_default(methods):
    import dataclasses

    from hardneg.config import FrameworkConfig

    documented = doc_framework_defaults(methods)
    assert documented, "methods.md has no framework defaults table"
    defaults = {f.name: f.default for f in dataclasses.fields(FrameworkConfig)}
    problems = framework_default_problems(documented, defaults)
    assert not problems, "docs/methods.md is out of date:\n" + "\n".join(problems)


def test_the_framework_classes_default_to_the_documented_values(methods):
    import inspect

    from hardneg.frameworks.memory_bank import MemoryBank
    from hardneg.frameworks.moco import MoCo

    classes = {"moco": MoCo, "memory_bank": MemoryBank}
    documented = doc_framework_defaults(methods)
    for (framework, setting), keyword in FRAMEWORK_KEYWORDS.items():
        parameter = inspect.signature(classes[framework].__init__).parameters[keyword]
        assert documented[(framework, setting)] == repr(parameter.default), (
            f"{classes[framework].__name__}({keyword}=...) defaults to {parameter.default!r}; "
            f"methods.md documents framework.{setting} = {documented[(framework, setting)]}"
        )


def test_the_framework_defaults_check_catches_a_missing_a_wrong_and_a_stale_row():
    documented = {("moco", "momentum"): "0.999", ("moco", "gone"): "1"}
    problems = framework_default_problems(
        documented, {"name": "simclr", "momentum": 0.99, "queue_size": 4096}
    )
    assert sorted(problems) == [
        "framework.gone is documented but is not a setting",
        "framework.momentum: documented 0.999, config 0.99",
        "framework.queue_size (default 4096) is not documented",
    ]
