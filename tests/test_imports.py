"""The package's import graph, read from the source (ast): no import cycles, counting the
imports inside functions too, and no imports of gemmakit modules inside functions outside a
short list of modules that defer them on purpose (the CLI starts without torch)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "gemmakit"

# module (or package prefix, ending in ".") -> why it imports gemmakit modules inside functions
DEFERRED_OK = {
    "gemmakit.commands.": "each subcommand imports what it runs when it runs: `gemmakit data` "
    "and `gemmakit tokenizer` start without torch",
    "gemmakit.tokenizer": "tokenizer commands start without torch (GGUF vocabularies need it)",
    "gemmakit.data.pipeline": "the tokenizer only when a config asks for tokenization",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


class Imports(ast.NodeVisitor):
    """The gemmakit modules a file imports: (module, line, inside a function)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.found: list[tuple[str, int, bool]] = []
        self.depth = 0

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = ast.unparse(node.test)
        if test in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            return  # never runs
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from the importer's package
            package = self.name if is_package(self.name) else self.name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}".rstrip(".")
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in MODULES else base, node.lineno)

    def _add(self, target: str, line: int) -> None:
        if target == "gemmakit" or target.startswith("gemmakit."):
            self.found.append((target, line, self.depth > 0))


def imports_of(name: str) -> list[tuple[str, int, bool]]:
    visitor = Imports(name)
    visitor.visit(ast.parse(MODULES[name].read_text(), str(MODULES[name])))
    return visitor.found


def edges(name: str) -> set[str]:
    """The modules whose code runs when `name` is imported and runs its imports: each target
    and the packages above it, except `gemmakit` itself (lazy exports only) and the packages
    that `name` is itself inside (their __init__ is already running)."""
    own = {name.rsplit(".", i)[0] for i in range(name.count("."))} | {name}
    out = set()
    for target, _, _ in imports_of(name):
        parts = target.split(".")
        for i in range(2, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in MODULES and mod not in own:
                out.add(mod)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_has_every_module():
    graph = {name: edges(name) for name in MODULES}
    assert "gemmakit.model.layers" in graph["gemmakit.model.transformer"]
    assert "gemmakit.kernels.train_ops" in graph["gemmakit.model.layers"]
    assert all(target in MODULES for targets in graph.values() for target in targets)


def test_no_import_cycles():
    graph = {name: edges(name) for name in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_gemmakit_imports_inside_functions_except_where_deferred_on_purpose():
    def allowed(name: str) -> bool:
        return any(name == k or (k.endswith(".") and name.startswith(k)) for k in DEFERRED_OK)

    found = [
        f"{MODULES[name].relative_to(ROOT.parent)}:{line}: imports {target} inside a function"
        for name in MODULES
        if not allowed(name)
        for target, line, inside in imports_of(name)
        if inside
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)
