"""Imports only go down: a fixed order of the package's parts, no cycles, Ray and Flower kept at the edge.

Every import statement counts, including those inside functions (a lazy import is still a
dependency); only ``if TYPE_CHECKING:`` blocks are exempt, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "fedtune"

# lowest first: a part may import only parts listed before it (and itself)
LAYERS = [
    "errors",
    "types",
    "registry",
    "config_base",
    "config_runtime",
    "config_training",
    "config_compression",
    "config_kd",
    "config_split",
    "config_privacy",
    "config_compare",
    "config",
    "config_reference",
    "codecs",
    "wire",
    "models",
    "data",
    "adapters",
    "reporting",
    "losses",
    "evaluation",
    "aggregation",
    "privacy",
    "client",
    "runtime",
    "paradigms",
    "assembly",
    "server",
    "experiment",
    "compare",
    "deploy",
    "cli",
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """Every module this file imports, external ones by their top-level name."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _resolve(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fedtune"


GRAPH = {m: {_resolve(i) for i in _imports(p) if i.startswith("fedtune")} - {m, ""} for m, p in MODULES.items()}


def test_every_part_has_a_layer():
    assert {_part(m) for m in MODULES} - {"fedtune"} <= set(LAYERS)


def test_imports_only_go_down():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [
        f"{m} imports {d}"
        for m, deps in GRAPH.items()
        for d in deps
        if _part(m) in rank and _part(d) in rank and rank[_part(d)] > rank[_part(m)]
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*path[path.index(d) :], d]))
            elif d not in state:
                walk(d, [*path, d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            walk(m, [m])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize(
    ("library", "allowed"),
    [
        ("ray", {"fedtune.runtime.ray_pool"}),
        ("flwr", {"fedtune.runtime.flower_grid", "fedtune.runtime.flower_wire"}),
    ],
)
def test_ray_and_flower_stay_in_their_runtime_and_deploy_modules(library, allowed):
    users = {m for m, p in MODULES.items() if library in {i.split(".")[0] for i in _imports(p)}}
    assert {m for m in users if not m.startswith("fedtune.deploy")} <= allowed


def test_the_flower_client_app_imports_nothing_heavy():
    """Flower starts a fresh ClientApp process for every message: it must not pay for torch."""
    heavy = {"torch", "transformers", "peft", "safetensors", "numpy"}
    for module in ("fedtune.deploy.app", "fedtune.runtime.flower_wire"):
        top = {i.split(".")[0] for i in _imports(MODULES[module])}
        assert not top & heavy, module
        assert {_resolve(i) for i in _imports(MODULES[module]) if i.startswith("fedtune")} <= {
            "fedtune.runtime.flower_wire",
            "fedtune.deploy.coordinator_app",  # imported inside the ServerApp's main, not per message
            "fedtune.deploy.local_worker",
        }
