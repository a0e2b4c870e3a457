"""The import graph: no cycles among the project's modules, and ``mixtures/`` needs nothing of
``trainer/`` (nor torch), so every controller runs on plain arrays.

Read statically from the sources (every ``import``, module-level or inside a function: a
function-local import is still a dependency, only a later one)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "mixtures")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod`` when that
    is a module, else as ``pkg``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import trainer.data.sampler as s` -> the module itself
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted.
    A package importing its own submodules (``__init__`` re-exports) is no cycle unless a
    submodule imports the package back."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reads_every_kind_of_import():
    g = graph()
    assert "trainer.checkpoint" in g["trainer.loop"]  # from . import checkpoint
    assert "mixtures" in g["trainer.loop"]  # from mixtures import ...
    assert any(m.startswith("trainer.data") for m in g["trainer.loop"])  # from .data.x import ...


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("module", sorted(m for m in modules() if m.split(".")[0] == "mixtures"))
def test_mixtures_import_nothing_of_the_trainer(module):
    path = modules()[module]
    tree = ast.parse(path.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
    bad = [n for n in names if n.split(".")[0] in ("trainer", "torch")]
    assert not bad, f"{module} imports {bad}: mixtures/ stays pure (numpy)"


def test_the_runtime_never_imports_the_offline_commands():
    """trainer.loop and everything it reaches stay clear of trainer.commands (compare, study, …)."""
    g = graph()
    seen, todo = set(), ["trainer.loop"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += g.get(m, ())
    offline = sorted(m for m in seen if m.startswith("trainer.commands"))
    assert not offline, f"the training loop reaches {offline}"
