"""Imports run downward: no circle among sdofm's modules or packages, and no sdofm import
hidden inside a function (outside the CLI, which imports what a command needs when it
runs, so that ``sdofm --help`` stays fast)."""

from __future__ import annotations

import ast
from pathlib import Path

import sdofm

ROOT = Path(sdofm.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = modules()


def imported(node: ast.AST) -> list[str]:
    """The sdofm modules an import statement names (``from a import b``: ``a.b`` when that
    is a module, else ``a``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        subs = [f"{node.module}.{a.name}" for a in node.names]
        names = [n for n in subs if n in MODULES]
        if len(names) < len(subs):
            names.append(node.module)
    else:
        return []
    out = []
    for n in names:
        while n and n not in MODULES:
            n = n.rpartition(".")[0]
        if n.startswith("sdofm"):
            out.append(n)
    return out


def scan(name: str) -> tuple[set[str], list[str]]:
    """(the sdofm modules ``name`` imports, the imports it makes inside functions)."""
    tree = ast.parse(MODULES[name].read_text())
    deps: set[str] = set()
    inner: list[str] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: no import at run time
            found = [m for m in imported(child) if m != name]
            deps.update(found)
            if in_function and found:
                inner.append(f"{MODULES[name].relative_to(ROOT.parent)}:{child.lineno}")
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(tree, False)
    return deps, inner


GRAPH = {m: scan(m) for m in MODULES}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            connect(v)
    return out


def package(module: str) -> str:
    """``sdofm.engine.loop`` -> ``sdofm.engine``; top-level modules are their own."""
    return ".".join(module.split(".")[:2])


def test_no_import_circle_among_modules():
    assert circles({m: deps for m, (deps, _) in GRAPH.items()}) == []


def test_no_import_circle_among_packages():
    graph: dict[str, set[str]] = {}
    for m, (deps, _) in GRAPH.items():
        graph.setdefault(package(m), set()).update(
            package(d) for d in deps if package(d) != package(m) and d != "sdofm"
        )
    assert circles(graph) == []


def test_no_sdofm_import_inside_a_function_outside_the_cli():
    hidden = [
        where for m, (_, inner) in GRAPH.items() if not m.startswith("sdofm.cli") for where in inner
    ]
    assert hidden == []


def test_the_checks_see_a_circle_and_a_hidden_import():
    """The scanner itself: a made-up circle is found, and so is an import in a function."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from sdofm.config import Config\n")
    fn = tree.body[0]
    assert imported(fn.body[0]) == ["sdofm.config"]
