"""The import graph of src/fewshot, read from the source: no cycles, and imports only point down
the layers ARCHITECTURE.md declares (its "Layers" block is the single list this test reads)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "fewshot"


def declared_layers(text: str) -> dict[str, int]:
    """{module or package prefix: layer}, 0 = the ground floor, from ARCHITECTURE.md's Layers block
    (top line first; each line lists names like `api.py` or `adapt/`)."""
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    lines = [line for line in block.splitlines() if line.strip()]
    layers: dict[str, int] = {}
    for depth, line in enumerate(reversed(lines)):
        for token in line.split():  # the names come first; the first other word starts the description
            named = re.fullmatch(r"([a-z_]+)(?:\.py|/)", token)
            if not named:
                break
            layers.setdefault(named.group(1), depth)
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the fewshot modules it imports}, every import statement counted (also those inside functions)."""
    modules = {module_name(p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == "fewshot")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                if base.split(".")[0] != "fewshot":
                    continue
                for alias in node.names:  # `from fewshot.data import views` imports the module fewshot.data.views
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        graph[name] = {t for t in targets if t != name}
    return graph


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    parts = module.split(".")[1:]  # drop "fewshot"
    return layers.get(parts[0]) if parts else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Imports from a module to one on a higher layer ("fewshot" itself, the package face, is the top)."""
    bad = []
    for module, targets in graph.items():
        here = layer_of(module, layers)
        if module == "fewshot":
            continue
        if here is None:
            bad.append(f"{module} is on no layer of ARCHITECTURE.md")
            continue
        for target in targets:
            there = layer_of(target, layers)
            if target == "fewshot" or (there is not None and there > here):
                bad.append(f"{module} (layer {here}) imports {target} (layer {there})")
    return sorted(bad)


LAYERS = declared_layers((ROOT / "ARCHITECTURE.md").read_text())


def test_every_module_is_on_a_declared_layer():
    graph = import_graph()
    missing = sorted({m.split(".")[1] for m in graph if m != "fewshot" and layer_of(m, LAYERS) is None})
    assert not missing, f"modules on no layer of ARCHITECTURE.md: {missing}"


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_imports_only_point_down_the_layers():
    assert upward_imports(import_graph(), LAYERS) == []


# Negative controls: the same checks on a tiny package written here, with the faults they must see.
def _toy_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "fewshot"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_and_an_upward_import_are_caught(tmp_path, monkeypatch):
    root = _toy_package(tmp_path, {
        "config.py": "",
        "data/__init__.py": "",
        "data/views.py": "from fewshot.data.viewmaker import X\n",
        "data/viewmaker.py": "def f():\n    from fewshot.data import views\n",  # a lazy import still counts
        "api.py": "import fewshot.data.views\n",
    })
    monkeypatch.setattr(__import__(__name__), "PACKAGE", root)
    graph = import_graph(root)
    assert cycles(graph) == [["fewshot.data.viewmaker", "fewshot.data.views"]]
    layers = {"config": 0, "data": 1, "api": 2}
    assert upward_imports(graph, layers) == []
    graph["fewshot.config"] = {"fewshot.api"}  # the ground floor reaching up
    assert upward_imports(graph, layers) == ["fewshot.config (layer 0) imports fewshot.api (layer 2)"]


def test_the_layers_block_is_read_as_declared():
    text = "## Layers\n```\ncli.py     thin\napi.py  x\ndata/   y\nconfig.py  io.py  errors.py   ground\n```\n"
    assert declared_layers(text) == {"config": 0, "io": 0, "errors": 0, "data": 1, "api": 2, "cli": 3}
