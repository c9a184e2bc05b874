"""The project's modules import each other without cycles, and each package imports on its own.

The graph has an edge A -> B for every ``import`` in A that is executed at run time (module level
or inside a function; ``if TYPE_CHECKING:`` blocks excluded), plus A -> P for each package P
whose ``__init__`` importing B runs first, unless A is inside P. A cycle in it is an import
order that can fail, or a layering that reads in both directions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("arguments", "utils", "pretrain_gpt2", "pretrain_bert", "generate_samples", "evaluate_gpt2")


def project_modules() -> dict[str, Path]:
    """Module name -> file, for the megatron package and the top-level entry points."""
    modules = {name: REPO / f"{name}.py" for name in TOP_LEVEL}
    for path in sorted((REPO / "megatron").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute names imported by ``module`` at run time (``from X import Y`` gives X and X.Y)."""
    names: list[str] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        pending.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for target in _imports(tree, name, path.name == "__init__.py"):
            parts = target.split(".")
            for depth in range(1, len(parts) + 1):  # the packages on the way run their __init__ first
                prefix = ".".join(parts[:depth])
                inside = name == prefix or name.startswith(prefix + ".")
                if prefix in modules and prefix != name and not inside:
                    graph[name].add(prefix)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_graph_sees_the_imports() -> None:
    graph = import_graph()
    assert "megatron.backends.base" in graph["megatron.backends.megatron"]
    assert "megatron.mpu" in graph["megatron.model.transformer"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(cycle) for cycle in cycles)


def test_layering() -> None:
    """mpu imports only torch; model imports no training, backend or checkpoint code."""
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("megatron.mpu"):
            assert all(t.startswith("megatron.mpu") for t in targets), (name, targets)
        if name.startswith("megatron.model"):
            bad = [t for t in targets if t.startswith(("megatron.training", "megatron.backends",
                                                       "megatron.checkpoint", "megatron.inference"))]
            assert not bad, (name, bad)


@pytest.mark.parametrize("module", ["megatron.backends", "megatron.checkpoint.protocol", "megatron.training.loop",
                                    "megatron.inference", "megatron.config", "pretrain_gpt2"])
def test_each_package_imports_on_its_own(module: str) -> None:
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
