"""Every page in docs/algorithms shows how to call it from Python: those examples run as written.

A fragment that needs a finished run (a trained adapter on disk) is fenced ```py and not run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGES = sorted((Path(__file__).parents[1] / "docs" / "algorithms").glob("*.md"))
BLOCKS = [
    pytest.param(code, id=f"{page.name}#{i}")
    for page in PAGES
    for i, code in enumerate(re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M))
]


def test_the_pages_have_examples():
    assert len(BLOCKS) >= 4, [p.name for p in PAGES]


@pytest.mark.parametrize("code", BLOCKS)
def test_a_python_example_runs_as_written(code):
    exec(compile(code, "<docs example>", "exec"), {"__name__": "docs_example"})


SECURITY = Path(__file__).parents[1] / "docs" / "security.md"
CITED = sorted(set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", SECURITY.read_text())))


def test_security_claims_cite_tests():
    """Every row of every threat | defence | test table names at least one test."""
    header, uncited = "", []
    for line in SECURITY.read_text().splitlines():
        if not line.startswith("|"):
            header = ""
        elif not header:
            header = line
        elif header.startswith("| threat") and not line.startswith("|---") and "`tests/" not in line:
            uncited.append(line[:80])
    assert len(CITED) >= 40 and not uncited, uncited


@pytest.mark.parametrize(("path", "name"), CITED, ids=[f"{p}::{n}" for p, n in CITED])
def test_every_test_docs_security_cites_exists(path, name):
    """docs/security.md names a test for every claim: each one it names is there, under that name."""
    source = (Path(__file__).parents[1] / path).read_text()
    assert re.search(rf"^def {name}\(", source, re.M), f"{path} has no test {name}"
