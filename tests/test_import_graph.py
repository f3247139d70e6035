"""The package's modules import each other without a cycle (issue 20).

Read statically from the sources, every ``import`` counted, also those inside functions
(a lazy import still ties two modules together: each then needs the other to be read).
Importing a module's own parent package is not an edge: Python runs the parent's
``__init__`` first anyway.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sft_kernels")


def _modules():
    mods = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                mods[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return mods


def _imported(module: str, is_package: bool, node, known) -> set:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = base + ("." + node.module if node.module else "")
        else:
            target = node.module or ""
        names = [target] + [f"{target}.{a.name}" for a in node.names]
    return {n for n in names if n in known}


def import_graph():
    mods = _modules()
    graph = {}
    for module, path in mods.items():
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= _imported(module, path.endswith("__init__.py"), node, mods)
        graph[module] = {d for d in deps if d != module and not module.startswith(d + ".")}
    return graph


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("edges, want", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, []),
])
def test_the_cycle_finder_finds_cycles(edges, want):
    assert cycles(edges) == want


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # backend.py imports `from ...backends import ...` at the top; op.py imports triton_kernels
    # inside a function (it must not need triton at import time)
    assert "sft_kernels.backends" in graph["sft_kernels.integrations.transformers.backend"]
    assert "sft_kernels.ops.sliding_window_attention.triton_kernels" in graph[
        "sft_kernels.ops.sliding_window_attention.op"]
