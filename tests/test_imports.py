"""proxy/ has no import cycle, and every module imports on its own in a fresh interpreter.

Shared state lives below the modules that use it: a module may refer to one above it only for
types, under ``if TYPE_CHECKING:``. An import inside a function counts like one at the top (a
lazy import does not remove a cycle, it only hides it until that function runs).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(
    "proxy" if path.stem == "__init__" else f"proxy.{path.stem}"
    for path in (ROOT / "proxy").glob("*.py")
)


def _is_type_checking(test: ast.expr) -> bool:
    name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
    return name == "TYPE_CHECKING"


def _statements(nodes: Iterable[ast.AST]) -> Iterator[ast.AST]:
    """Every node under ``nodes``, skipping the bodies of ``if TYPE_CHECKING:``."""
    for node in nodes:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.orelse)
            continue
        yield node
        yield from _statements(ast.iter_child_nodes(node))


def runtime_imports(module: str) -> set[str]:
    """The proxy modules ``module`` imports when it runs (anywhere but under TYPE_CHECKING)."""
    name = "__init__" if module == "proxy" else module.removeprefix("proxy.")
    tree = ast.parse((ROOT / "proxy" / f"{name}.py").read_text())
    found: set[str] = set()
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "proxy")
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module == "proxy":  # from proxy import x: the submodule x, or the package
                found.update(
                    f"proxy.{a.name}" if f"proxy.{a.name}" in MODULES else "proxy"
                    for a in node.names
                )
            elif node.module.startswith("proxy."):
                found.add(node.module)
    found.discard(module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle is not None:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle is not None:
            return cycle
    return None


def test_the_scan_sees_runtime_imports_and_skips_type_only_ones() -> None:
    assert {"proxy.runtime", "proxy.admin", "proxy.dispatch"} <= runtime_imports("proxy.server")
    assert "proxy.runtime" not in runtime_imports("proxy.dispatch")  # under TYPE_CHECKING
    assert "proxy.server" in runtime_imports("proxy.__main__")  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_proxy() -> None:
    graph = {module: runtime_imports(module) for module in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone_in_a_fresh_interpreter(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
