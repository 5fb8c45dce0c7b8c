"""qtrain's modules import one way: no cycle, lazy (function-level) imports included.

The graph is read from the source with ast, so an import inside a function counts as much as one at the
top: a cycle hidden behind a lazy import is still a cycle. `from pkg import name` is an edge to the
submodule pkg.name when that is a module, else to pkg. A package's implicit import of its parent
__init__ is not an edge (every submodule would otherwise form a cycle with its package).
"""

from __future__ import annotations

import ast
from pathlib import Path

import qtrain

ROOT = Path(qtrain.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = ["qtrain", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = graph.setdefault(name, set())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_the_graph_sees_lazy_imports():
    graph = {"a": {"b"}, "b": {"a"}}
    assert find_cycle(graph) == ["a", "b", "a"]
    # the real graph: cli imports its commands inside functions, and that edge is seen
    real = import_graph()
    assert any(m.startswith("qtrain.") for m in real["qtrain.cli"])


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


# Lower layers never import upper ones (the chain cli -> commands -> run state / loop / estimate /
# export -> updater, model, data -> optim, quant -> seeding).
LOWER_MUST_NOT_IMPORT = {
    "qtrain.seeding": ("qtrain.",),
    "qtrain.quant": ("qtrain.optim", "qtrain.model", "qtrain.updater", "qtrain.release", "qtrain.train",
                     "qtrain.loop", "qtrain.cli", "qtrain.commands", "qtrain.estimate", "qtrain.data"),
    "qtrain.optim": ("qtrain.model", "qtrain.updater", "qtrain.release", "qtrain.train", "qtrain.loop",
                     "qtrain.cli", "qtrain.commands", "qtrain.estimate", "qtrain.data"),
    "qtrain.config": ("qtrain.",),
}


def test_lower_layers_do_not_import_upper_ones():
    graph = import_graph()
    bad = []
    for prefix, forbidden in LOWER_MUST_NOT_IMPORT.items():
        for mod, edges in graph.items():
            if mod == prefix or mod.startswith(prefix + "."):
                bad += [f"{mod} -> {e}" for e in edges if e.startswith(forbidden) and not e.startswith(prefix)]
    assert not bad, bad
