"""The shape of the code: layers that only point down, and no import circle (local imports count).

Each module of `src/datm` sits on a floor (`FLOORS`: the longest matching prefix decides); a module
may import only modules on lower floors or in its own package on the same floor. The pipeline's
stages are packages: data → config → plan → train | merge → eval → merge.select → analysis → auto →
run → serve → cli.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

FLOORS: dict[str, int] = {
    "datm.errors": 0,
    "datm.log": 0,
    "datm.languages": 1,
    "datm.device": 1,
    "datm.artifacts": 2,
    "datm.models": 3,
    "datm.tiny": 3,
    "datm.data": 4,
    "datm.config": 5,
    "datm.plan": 6,
    "datm.train": 7,
    "datm.merge": 7,
    "datm.eval": 8,
    "datm.merge.select": 9,
    "datm.analysis": 10,
    "datm.auto": 11,
    "datm.run": 12,
    "datm.serve": 13,
    "datm.demo": 14,
    "datm.cli": 15,
    "datm": 16,  # the package itself
}


def modules(root: Path = SRC) -> dict[str, Path]:
    out = {}
    for f in sorted((root / "datm").rglob("*.py")):
        parts = f.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _target(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The datm modules `name` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            if t == "datm" or t.startswith("datm."):
                found = _target(t, known)
                if found and found != name:
                    out.add(found)
    return out


def graph(root: Path = SRC) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def floor(name: str) -> tuple[str, int]:
    prefix = max((p for p in FLOORS if name == p or name.startswith(p + ".")), key=len)
    return prefix, FLOORS[prefix]


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for a, targets in sorted(edges.items()):
        pa, fa = floor(a)
        for b in sorted(targets):
            pb, fb = floor(b)
            if fb > fa or (fb == fa and pa != pb):
                wrong.append(f"{a} (floor {fa}, {pa}) imports {b} (floor {fb}, {pb})")
    return wrong


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_floor():
    for name in modules():
        assert floor(name), name


def test_no_import_circle():
    assert cycles(graph()) == []


def test_layers_only_point_down():
    assert upward_imports(graph()) == []


def test_the_check_catches_an_upward_import(tmp_path):
    """Add `from datm.run import runner` to the data stage of a copy of the tree: both checks fail."""
    import shutil

    copy = tmp_path / "src"
    shutil.copytree(SRC / "datm", copy / "datm", ignore=shutil.ignore_patterns("__pycache__", "demo_data"))
    target = copy / "datm" / "data" / "records.py"
    target.write_text(target.read_text(encoding="utf-8") + "\n\ndef f():\n    from datm.run import runner\n")
    edges = graph(copy)
    assert any(w.startswith("datm.data.records (floor 4") for w in upward_imports(edges))
    assert cycles(edges), "run imports data, so data importing run closes a circle"


@pytest.mark.parametrize("limit", [60])
def test_no_function_over_60_lines(limit):
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert long == []
