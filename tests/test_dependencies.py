"""Every package fedtune's modules import when loaded is one `pip install fedtune` brings (or an extra's).

A module-level import of a package that only a dev or optional extra pulls in works in the test
environment and breaks on a user's machine (the quickstart's `pip install -e .`); this reads each
module's top-level imports and checks them against what the base requirements install.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement

SRC = Path(__file__).resolve().parent.parent / "src" / "fedtune"
# modules that belong to an extra and import its packages at load time (never imported by the core)
EXTRAS = {"ray": {"runtime/ray_pool.py"}, "flwr": {"runtime/flower_grid.py", "deploy"}}


def _closure(extra: str = "") -> set[str]:
    """Distributions installed by fedtune's requirements (with ``extra``), transitively, normalised names."""
    seen, todo = set(), ["fedtune"]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            env = {"extra": extra if name == "fedtune" else ""}
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return seen


def _imports(path: Path) -> set[str]:
    """Modules imported when the module loads: not inside functions, TYPE_CHECKING or try blocks."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _top_level_imports(path: Path) -> set[str]:
    return {name.split(".")[0] for name in _imports(path)}


def _in_extra(rel: str) -> bool:
    return any(rel == m or rel.startswith(m + "/") for mods in EXTRAS.values() for m in mods)


def _own_path(module: str) -> str:
    """fedtune.a.b -> a/b.py, or a/b when that is a package."""
    rel = module.split(".", 1)[1].replace(".", "/") if "." in module else ""
    return rel if (SRC / rel).is_dir() else rel + ".py"


def test_every_module_level_import_is_a_base_requirement():
    base = _closure()
    dists = md.packages_distributions()
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if _in_extra(rel):
            continue
        missing += [
            f"{rel} imports {m}, which needs an extra"
            for m in _imports(path)
            if m.startswith("fedtune.") and _in_extra(_own_path(m))
        ]
        for root in _top_level_imports(path) - set(sys.stdlib_module_names) - {"fedtune", "__future__"}:
            owners = {d.lower().replace("_", "-") for d in dists.get(root, [root])}
            if not owners & base:
                missing.append(f"{rel} imports {root} ({', '.join(sorted(owners))}): not in fedtune's requirements")
    assert not missing, "\n".join(missing)


def test_the_check_sees_a_package_only_an_extra_brings():
    assert "flwr" not in _closure() and "flwr" in _closure("flower")
    assert "flwr" in _top_level_imports(SRC / "runtime" / "flower_grid.py")
    assert _in_extra(_own_path("fedtune.deploy.app")) and not _in_extra(_own_path("fedtune.runtime.in_process"))
