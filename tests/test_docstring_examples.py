"""The docstring examples of the package run as written: every ``>>>`` example under
``src/hardneg`` is executed with :mod:`doctest` and must print what its docstring says, and every
built-in strategy shows how it is built in an example of its own module.

The modules are found by a scan of the source text for ``>>>``, so an example added to any module
is checked without a list here to update (and a module that holds ``>>>`` but whose examples
doctest cannot find, e.g. in a string that is not a docstring, fails instead of passing empty).
"""

from __future__ import annotations

import doctest
import importlib
import io
import re
from pathlib import Path

import pytest
import torch

import hardneg
from hardneg.registry import strategy_class

SRC = Path(__file__).resolve().parents[1] / "src" / "hardneg"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules_with_examples() -> list[str]:
    return sorted(
        module_name(p) for p in SRC.rglob("*.py") if ">>>" in p.read_text(encoding="utf-8")
    )


def doctests_of(module: str) -> list[doctest.DocTest]:
    """The doctests of the module's own objects (re-exported names are checked where defined)."""
    found = doctest.DocTestFinder(exclude_empty=True).find(importlib.import_module(module), module)
    return [t for t in found if t.examples]


def failures(tests: list[doctest.DocTest]) -> tuple[int, str]:
    """Number of failing examples and doctest's report of them."""
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    # the examples draw from torch's global RNG: a fixed seed makes a failure reproducible, and
    # fork_rng leaves the stream of the tests that run after this one as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for test in tests:
            runner.run(test, out=report.write)
    return runner.failures, report.getvalue()


def test_the_scan_finds_the_examples_of_the_public_api():
    # guards the scan: a moved source folder would otherwise leave nothing to check
    found = set(modules_with_examples())
    assert {"hardneg", "hardneg.losses.contrastive", "hardneg.strategies.importance"} <= found


@pytest.mark.parametrize("module", modules_with_examples())
def test_the_docstring_examples_run_as_written(module):
    tests = doctests_of(module)
    assert tests, f"{module} holds '>>>' but doctest finds no example in its docstrings"
    failed, report = failures(tests)
    assert failed == 0, f"docstring examples of {module} fail:\n{report[-4000:]}"


def test_a_wrong_expected_output_is_reported():
    # the runner must compare outputs, not only run the code: a docstring whose stated result
    # is wrong fails
    parser = doctest.DocTestParser()
    wrong = parser.get_doctest(">>> 1 + 1\n3\n", {}, "wrong", None, 0)
    right = parser.get_doctest(">>> 1 + 1\n2\n", {}, "right", None, 0)
    assert failures([wrong])[0] == 1
    assert failures([right])[0] == 0


def builtin_strategies() -> list[str]:
    return [n for n in hardneg.list_losses() if strategy_class(n).__module__.startswith("hardneg.")]


@pytest.mark.parametrize("name", builtin_strategies())
def test_each_builtin_strategy_has_an_example_that_builds_it(name):
    module = strategy_class(name).__module__
    sources = "".join(e.source for t in doctests_of(module) for e in t.examples)
    assert re.search(rf"create_loss\(\s*[\"']{name}[\"']", sources), (
        f"no '>>>' example of {module} builds create_loss({name!r}, ...)"
    )
