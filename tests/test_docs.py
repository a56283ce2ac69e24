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
