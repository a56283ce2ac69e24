"""Imports only go down: a fixed order of the package's parts, no cycles, nothing sideways, Ray and Flower
kept at the edge.

Every import statement counts: those inside functions (a lazy import is still a dependency) and those
under ``if TYPE_CHECKING:`` (a type named from above is a dependency too). Within a part, sibling
packages do not import each other (a module of their parent is shared ground), and a plug-in package
(a paradigm) is imported by nothing outside it: its registry line names it by a string.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "fedtune"

# lowest first: a part may import only parts listed before it (and itself)
LAYERS = [
    "core",
    "config",
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
    "tune",
    "flowertune",
    "deploy",
    "cli",
]
PLUGIN_PACKAGES = ("fedtune.paradigms",)  # each package inside is a plug-in that only its registry line names


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module this file imports (type-only imports included), external ones by their top-level name."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
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


def _package_of(module: str) -> str:
    """The package a module's file sits in (a package's own __init__ sits in the package itself)."""
    path = MODULES[module]
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _extended() -> set[tuple[str, str]]:
    """(plug-in package, the package it extends): the one sideways import a paradigm declares
    (``Paradigm.extends``)."""
    from fedtune.config.paradigm import paradigm_of
    from fedtune.core.registry import PARADIGMS

    out = set()
    for entry in PARADIGMS:
        plugin = paradigm_of(entry.name)
        if plugin.extends is not None:
            base = paradigm_of(plugin.extends)
            out.add((plugin.setup.rpartition(".")[0], base.setup.rpartition(".")[0]))
    return out


def _declared(m: str, d: str, extended: set[tuple[str, str]]) -> bool:
    return any((m == a or m.startswith(a + ".")) and (d == b or d.startswith(b + ".")) for a, b in extended)


def test_sibling_packages_do_not_import_each_other():
    """``paradigms/split`` may use ``paradigms/base.py`` (their parent's shared ground), never ``paradigms/kd``;
    a paradigm that declares it extends another (``Paradigm.extends``) may import that one."""
    sideways = []
    extended = _extended()
    for m, deps in GRAPH.items():
        for d in deps:
            if _declared(m, d, extended):
                continue
            a, b = _package_of(m).split("."), _package_of(d).split(".")
            common = 0
            while common < min(len(a), len(b)) and a[common] == b[common]:
                common += 1
            if common >= 2 and common < len(a) and common < len(b):  # one part; each in a package below the common
                sideways.append(f"{m} imports {d}")
    assert not sideways, "\n".join(sorted(sideways))


def test_plug_in_packages_are_named_never_imported():
    """A paradigm's package is imported by nothing outside it (but a paradigm that declares it extends it): the
    registry names it, the config loads it."""
    plugins = {
        m for m in MODULES if any(m.startswith(p + ".") and m.count(".") == p.count(".") + 1 for p in PLUGIN_PACKAGES)
    }
    plugins = {m for m in plugins if MODULES[m].name == "__init__.py"}
    assert {"fedtune.paradigms.kd", "fedtune.paradigms.split", "fedtune.paradigms.parameter_sharing"} <= plugins
    extended = _extended()
    outside = [
        f"{m} imports {d}"
        for m, deps in GRAPH.items()
        for d in deps
        for plugin in plugins
        if (d == plugin or d.startswith(plugin + "."))
        and not (m == plugin or m.startswith(plugin + "."))
        and not _declared(m, d, extended)
    ]
    assert not outside, "\n".join(sorted(outside))


@pytest.mark.parametrize(
    ("library", "allowed"),
    [
        ("ray", {"fedtune.runtime.ray_pool"}),
        ("flwr", {"fedtune.runtime.flower_grid", "fedtune.runtime.flower_wire", "fedtune.runtime.direct_grid"}),
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


def test_the_package_and_the_docs_list_the_layers_the_test_checks():
    """The layer list a newcomer reads (the package docstring, docs/architecture.md) is the one enforced here."""
    import fedtune

    listed = [line.split()[0] for line in fedtune.__doc__.splitlines() if line.startswith("  ") and line.split()]
    assert listed == LAYERS
    docs = (SRC.parent.parent / "docs" / "architecture.md").read_text()
    drawn = docs.split("## Layers", 1)[1].split("```", 2)[1]
    assert [p.strip() for p in drawn.replace("\n", " ").split("─")] == LAYERS
