"""The import rules of docs/ARCHITECTURE.md, read from the source (an AST walk, nothing imported):
who may import what, and no import cycles between modules (imports inside functions count too)."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "tokenizer", "kernels", "engine", "cli")
# engine's rooms, bottom to top: a module may import its own room and the rooms below it.
ENGINE_ROOMS = ("engine.config", "engine.data", "engine.model", "engine.train", "engine.downstream", "engine.demo")
# package -> top-level names it must never import (beyond the rooms rule above).
FORBIDDEN = {
    "common": {"torch", "tokenizer", "kernels", "engine", "cli"},
    "tokenizer": {"torch", "engine", "kernels", "cli"},
    "kernels": {"engine", "tokenizer", "cli"},
    "engine": {"cli"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every module name ``path`` imports (absolute, as written), at any depth of the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    """module -> the repository modules it imports (``from pkg import sub`` counts as importing pkg.sub)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        edges = set()
        for imported in _imports(name, path):
            m = imported
            while m and m not in mods:
                m = m.rpartition(".")[0]
            if m and m != name:
                edges.add(m)
        # `from pkg import sub` names pkg and pkg.sub: the edge is to the submodule, not to pkg's __init__
        graph[name] = {m for m in edges if not any(o.startswith(m + ".") and o in edges for o in edges)}
    return graph


def _room(module: str) -> int | None:
    for i, room in enumerate(ENGINE_ROOMS):
        if module == room or module.startswith(room + "."):
            return i
    return None


def test_packages_import_only_what_lies_below_them():
    bad = []
    for name, path in _modules().items():
        top = name.split(".")[0]
        for imported in _imports(name, path):
            if imported.split(".")[0] in FORBIDDEN.get(top, ()):
                bad.append(f"{name} imports {imported}")
    assert not bad, "\n".join(sorted(bad))


def test_engine_rooms_import_downwards_only():
    bad = []
    for name, edges in _graph().items():
        here = _room(name)
        if here is None:
            continue
        bad += [f"{name} imports {m}" for m in edges if (_room(m) or 0) > here]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


@pytest.mark.parametrize("source, rule", [
    ("import torch\n", "tokenizer"),
    ("from engine.config import RunConfig\n", "kernels"),
    ("def f():\n    from cli.main import main\n", "engine"),
])
def test_the_walk_sees_a_forbidden_import(tmp_path, source, rule):
    """The checks would catch a violation, also one inside a function."""
    path = tmp_path / "m.py"
    path.write_text(source)
    imported = _imports(f"{rule}.m", path)
    assert any(i.split(".")[0] in FORBIDDEN[rule] for i in imported)


def test_a_cycle_would_be_found(monkeypatch):
    fake = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: fake)
    with pytest.raises(AssertionError, match="'a', 'b', 'c'"):
        test_no_import_cycles()
