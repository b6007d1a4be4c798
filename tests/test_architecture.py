"""How the modules fit together: no import cycle, the library never imports the CLI, registries complete on
import, and the command line starts without importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "relist"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the relist modules it imports, read from the source. Imports inside functions count too;
    ``from package import name`` is an edge to ``package.name`` when that is a module, else to ``package``;
    importing a module is also an edge to the packages above it that the importer is not inside."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                resolved = known(target) if target.startswith("relist") else None
                if not resolved or resolved == module:
                    continue
                graph[module].add(resolved)
                # importing a.b.c runs the packages a and a.b first: an edge to each that is not already
                # being imported around this module (its own packages)
                parts = resolved.split(".")
                for k in range(1, len(parts)):
                    parent = ".".join(parts[:k])
                    if parent in files and not (module == parent or module.startswith(parent + ".")):
                        graph[module].add(parent)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_reader_sees_a_cycle_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_reader_sees_a_cycle_through_a_package_init(tmp_path, monkeypatch):
    """p/__init__ imports q, and q imports p.m: importing q first runs p/__init__, which needs q."""
    pkg = tmp_path / "relist"
    (pkg / "p").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "p" / "__init__.py").write_text("from relist.q import X\n")
    (pkg / "p" / "m.py").write_text("Y = 1\n")
    (pkg / "q.py").write_text("def f():\n    from relist.p.m import Y\n\n\nX = 2\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    assert cycles(import_graph()) == [["relist.p", "relist.q"]]


def test_the_graph_reader_counts_imports_inside_functions():
    graph = import_graph()
    # relist.cli resolves its commands at run time, and relist/__init__ imports relist.batch inside a function
    assert "relist.batch" in graph["relist"]


def test_no_import_cycle_among_relist_modules():
    assert cycles(import_graph()) == []


def test_only_the_cli_imports_the_cli():
    offenders = sorted(
        m
        for m, targets in import_graph().items()
        if not (m == "relist.cli" or m.startswith("relist.cli."))
        and any(t == "relist.cli" or t.startswith("relist.cli.") for t in targets)
    )
    assert offenders == []


@pytest.mark.parametrize(
    "code",
    [
        "from relist.rerankers import REGISTRY; print(sorted(REGISTRY))",
        "from relist.rerankers.base import REGISTRY; print(sorted(REGISTRY))",
    ],
)
def test_the_reranker_registry_is_complete_on_import(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("dlcm", "evaluator", "generator", "gsf", "midnn", "pear", "prm", "raise", "seq2slate", "setrank"):
        assert f"'{name}'" in out


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys; from relist.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'relist --help imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
