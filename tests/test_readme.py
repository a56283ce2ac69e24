"""The README's two set-up commands come first, and CI runs the README's test command verbatim, then the slow set."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_starts_with_install_and_quickstart_then_tests():
    first, second = _commands()[:2]
    assert "pip install torch==2.13.0" in first and first.endswith("fedtune run examples/quickstart.yaml")
    assert "pip install torch==2.13.0" in second and second.endswith("pytest")


def test_ci_runs_the_readme_test_command_then_the_slow_set():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert _commands()[1] in ci
    assert ci[ci.index(_commands()[1]) + 1 :] == ["pip install -e '.[ci-slow]'", "pytest -m slow"]


def test_quickstart_config_exists_and_validates():
    from fedtune.config import load_config

    cfg = load_config(ROOT / "examples" / "quickstart.yaml")
    assert cfg.model.name == "smollm2-135m" and cfg.partition.num_clients >= 4
