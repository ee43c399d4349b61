"""The README and docs/*.md name only command-line options that exist, and their links between
files and to headings resolve.

The options are read from the ``hardneg`` parser itself (each command declares its own), so a
renamed or removed option fails here instead of leaving the docs to describe it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from hardneg.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"\bhardneg\s+(demo|train|eval|compare|losses|mine)\b")


def command_options() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: {s for action in p._actions for s in action.option_strings}
        for name, p in sub.choices.items()
    }


def code_spans(text: str) -> list[str]:
    """Inline code (it may wrap a line), and each line of indented or fenced code."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = re.findall(r"`([^`]+)`", text)
    spans += re.findall(r"^ {4,}(\S.*)$", text, re.M)
    return spans + [line for block in fenced for line in block.splitlines()]


def unknown_options(text: str, options: dict[str, set[str]]) -> list[str]:
    """``hardneg CMD ... --opt`` in code spans where CMD has no ``--opt``."""
    problems = []
    for span in code_spans(text):
        span = span.replace("\\\n", " ")
        found = list(COMMAND.finditer(span))
        for i, match in enumerate(found):
            end = found[i + 1].start() if i + 1 < len(found) else len(span)
            rest = span[match.end() : end].split("#")[0]  # a shell comment is not an option
            for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                if option not in options[match.group(1)]:
                    problems.append(f"hardneg {match.group(1)} {option}")
    return problems


def test_the_scan_finds_commands_with_options_in_the_readme():
    # guards the scan: the README's quick start must be seen, with its options
    spans = code_spans((ROOT / "README.md").read_text(encoding="utf-8"))
    assert any("hardneg demo --strategies" in s for s in spans)
    assert unknown_options("`hardneg demo --no-such-option`", command_options()) == [
        "hardneg demo --no-such-option"
    ]
    assert unknown_options("`hardneg mine --data x --output y`", command_options()) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_line_option_named_in_the_docs_exists(doc):
    problems = unknown_options(doc.read_text(encoding="utf-8"), command_options())
    assert not problems, f"{doc.name} names options the commands do not have: {problems}"


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but ``-`` and ``_`` dropped, spaces to
    ``-``, a repeated heading numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#+\s+(.*?)\s*$", re.sub(r"```.*?```", "", text, flags=re.S), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(doc: Path) -> list[str]:
    text = doc.read_text(encoding="utf-8")
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md":
            if anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{target}: no such heading")
    return problems


def test_anchors_follow_github_s_rule():
    text = "# Results\n## Running the GPU check\n### `hardneg demo`\n## Results\n"
    assert anchors(text) == {"results", "running-the-gpu-check", "hardneg-demo", "results-1"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_between_the_docs_resolve(doc):
    problems = broken_links(doc)
    assert not problems, f"{doc.name} has broken links: {problems}"
