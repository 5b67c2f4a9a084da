"""tether's import graph has no circle.

Definition: module A depends on module B when any ``import`` in A names B (or a name inside B):
module-level imports *and* imports inside functions and classes, which tether uses to stay fast to
start (``tether --help``) and to load optional dependencies late. A lazy import is still a dependency:
a circle through one means neither module can be read, tested or moved without the other, and that the
circle only fails to crash because of where the import sits. Only imports under ``if TYPE_CHECKING:``
are left out (they never run). Imports of outside packages are ignored. The usual, weaker definition
(module-level imports only) found no circle even in the code this test was written against, which had
one of seven modules through two function-level imports (checks -> trainers.online -> generation ->
checks, and rollout -> online); this definition finds it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tether

ROOT = Path(tether.__file__).parent


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``root`` (a package folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(body, *, in_type_checking: bool = False):
    """Every Import / ImportFrom node in ``body``, at any depth, except under ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, (ast.Name, ast.Attribute))
            and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
        ):
            yield from _imports(node.orelse)
            continue
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                yield from _imports([child])
            elif isinstance(child, ast.excepthandler):
                yield from _imports(child.body)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package's modules it imports (each name resolved to the longest module it is in)."""
    mods = _modules(root)

    def owner(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        deps = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path)).body):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [target] + [f"{target}.{a.name}" for a in node.names]  # `from pkg import module`
            deps |= {o for o in map(owner, names) if o and o != mod}
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_tether_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and "tether.trainers.online" in graph["tether.trainers.ppo"]  # the parser sees the imports
    assert cycles(graph) == []


def test_the_method_contract_imports_no_loop_code():
    """A method's file needs only the contract and the math: trainers.method reaches no loop module."""
    graph = import_graph()
    seen, todo = set(), ["tether.trainers.method"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    assert not seen & {"tether.trainers.online", "tether.trainers.rollout", "tether.engine", "tether.generation"}, (
        sorted(seen)
    )


def test_the_checker_finds_a_circle_through_a_function_level_import(tmp_path):
    """The definition above on a three-module package: a -> b at module level, b -> c inside a function,
    c -> a at module level is a circle; the same import under ``if TYPE_CHECKING:`` is not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import g\n    return g\n")
    (pkg / "c.py").write_text("from pkg.a import b as _b\ndef g():\n    pass\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b", "pkg.c"]]
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import g\n")
    assert cycles(import_graph(pkg)) == []
