from pathlib import Path

from fedtune.config.reference import render_reference


def test_docs_configuration_is_current():
    doc = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    assert doc.read_text() == render_reference(), "run: python -m fedtune.config.reference > docs/configuration.md"


def test_every_key_is_documented():
    assert "|  |" not in render_reference()
