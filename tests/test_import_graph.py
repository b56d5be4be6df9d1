"""The package's import graph: no circle, and the layering of docs/ARCHITECTURE.md.

The graph is read from the source (every ``import`` statement, at module level
or inside a function: a lazy import that closes a circle is still a circle), so
the test needs no build. Edges go to the module an import names: ``from a.b
import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``. The
parent packages that Python imports on the way are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "metalm_fast"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, names in _imports(name, path):
            if not module.startswith("metalm_fast"):
                continue
            targets = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
            if len(targets) < len(names) or not names:
                targets.add(module)
            graph[name] |= {t for t in targets if t in MODULES and t != name}
    return graph


GRAPH = _graph()


def _cycle() -> list[str] | None:
    """One import circle of GRAPH, as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(GRAPH[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := visit(node)):
            return found
    return None


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_sees_the_package():
    assert "metalm_fast.nn.fused_decode" in GRAPH["metalm_fast.nn.transformer_block"]
    assert "metalm_fast.ops.kv_cache_append" in GRAPH["metalm_fast.nn.paged_kv_cache"]


def test_no_import_circle():
    cycle = _cycle()
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("models", {"kernels", "data", "training", "evaluation", "commands"}),
        ("nn", {"kernels", "models", "data", "training", "evaluation", "commands"}),
        ("ops", {"nn", "models", "data", "training", "evaluation", "commands"}),
        ("data", {"training", "evaluation", "commands"}),
        ("hf", {"data", "training", "evaluation", "commands"}),
    ],
)
def test_layers_import_only_downward(layer, forbidden):
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if _layer(name) == layer
        for target in targets
        if _layer(target) in forbidden
    )
    assert not wrong, wrong


@pytest.mark.parametrize("layer", ["nn", "models"])
def test_modules_use_public_names_of_other_layers(layer):
    """nn/ and models/ take no underscore name and no underscore module from another
    layer (a private helper of ops/ is not an entry point)."""
    wrong = []
    for name, path in MODULES.items():
        if _layer(name) != layer:
            continue
        for module, names in _imports(name, path):
            if not module.startswith("metalm_fast.") or _layer(module) == layer:
                continue
            private = [n for n in names if n.startswith("_")]
            if private or any(part.startswith("_") for part in module.split(".")):
                wrong.append(f"{name}: from {module} import {', '.join(names)}")
    assert not wrong, wrong


def test_only_the_transformers_bridges_import_transformers():
    """Loading pretrained weights needs safetensors only; transformers is imported where
    a transformers object is made or registered (register, the export's check)."""
    importers = sorted(
        {
            name
            for name, path in MODULES.items()
            for module, _ in _imports(name, path)
            if module == "transformers" or module.startswith("transformers.")
        }
    )
    assert importers == ["metalm_fast.hf.attention", "metalm_fast.hf.export"], importers
