"""The package's modules import each other without a cycle (counting imports inside functions
too: a lazy import hides a cycle from Python, not from a reader), the engine never imports the
features built on it, and importing puregpt loads no heavy standard-library module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers_train import REPO, cli_env

PACKAGE = REPO / "puregpt"
# The engine: what a reader of the model needs. Features (the CLI, the API, the x-ray page,
# compare, export...) are built on it and reach it through its public functions.
ENGINE = {"config", "ops", "model", "optim", "tokenizer", "bpe", "data", "sample", "fsutil"}


def module_imports() -> dict[str, set[str]]:
    """module name -> the puregpt modules it imports anywhere in its source."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from . import x / from .x import y
                    if node.module:
                        found.add(node.module.split(".")[0])
                    else:
                        found.update(a.name for a in node.names)
                elif node.module and node.module.split(".")[0] == "puregpt":
                    parts = node.module.split(".")
                    if len(parts) > 1:
                        found.add(parts[1])
                    else:
                        found.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == "puregpt" and len(parts) > 1:
                        found.add(parts[1])
        modules = {p.stem for p in PACKAGE.glob("*.py")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules (first == last), or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_cycle_in_the_package():
    graph = module_imports()
    assert {"model", "ops", "train", "checkpoint", "bpe", "tokenizer"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_engine_imports_only_the_engine():
    graph = module_imports()
    for name in sorted(ENGINE & set(graph)):
        outside = graph[name] - ENGINE
        assert not outside, f"engine module {name} imports {sorted(outside)}"


def test_file_helpers_know_nothing_of_models():
    assert module_imports()["fsutil"] == set()


def test_importing_puregpt_stays_light():
    # (compared with what the interpreter had loaded before: site hooks may load more)
    code = ("import sys; before = set(sys.modules); import puregpt; heavy = {'urllib', 'http', "
            "'xml', 'statistics', 'email', 'multiprocessing', 'asyncio', 'socket'} & "
            "{m.split('.')[0] for m in set(sys.modules) - before}; print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
