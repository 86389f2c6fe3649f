"""The package's layout: imports point one way, down the data flow, and form no circle.

Every import is read from the source (ast), lazy ones inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "backprop_ninja"

# The layers, lowest first: a module may import from its own layer and the layers below it only.
LAYERS = [
    {"conventions", "errors", "files", "threads", "apart", "native"},
    {"data"},
    {"ops"},
    {"nn"},
    {"models"},
    {"optim"},
    {"sampling"},
    {"lecture"},
    {"checking"},
    {"grading"},
    {"training"},
    {"bench"},
    {"cli", "__main__", "__init__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The backprop_ninja modules a file imports (relative to the package), lazy imports included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("backprop_ninja."):
                found.add(name.removeprefix("backprop_ninja."))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # `from backprop_ninja.data import load_dataset` names a module or a name in one: keep modules
        edges[name] = {target for target in imports_of(path) if target in modules and target != name}
    return edges


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS: add its subpackage there and to docs/architecture.md")


def test_every_module_belongs_to_a_layer():
    for module in graph():
        layer_of(module)


def test_imports_point_down_the_data_flow():
    upward = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, upward


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules, or None (a depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    # a package's __init__ that re-exports its modules is no circle with them: its modules import each
    # other directly, never through the package
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph().items()}
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set()}, None),
])
def test_the_circle_finder_finds_circles(edges, expected):
    assert find_cycle(edges) == expected


def test_lazy_imports_are_read_too(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from backprop_ninja.training import loop\n    import backprop_ninja.cli\n")
    assert imports_of(source) == {"training", "training.loop", "cli"}


def test_one_lecture_seed():
    """LECTURE_SEED's value is written in one place: conventions.py."""
    holders = [p for p in PACKAGE.rglob("*.py") if "2147483647" in p.read_text(encoding="utf-8")]
    assert [p.name for p in holders] == ["conventions.py"], holders
