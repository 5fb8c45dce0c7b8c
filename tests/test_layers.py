"""qtrain's modules import one way: no cycle, lazy (function-level) imports included.

The graph is read from the source with ast, so an import inside a function counts as much as one at the
top: a cycle hidden behind a lazy import is still a cycle. `from pkg import name` is an edge to the
submodule pkg.name when that is a module, else to pkg. A package's implicit import of its parent
__init__ is not an edge (every submodule would otherwise form a cycle with its package). Nor is an import
under `if TYPE_CHECKING:`: it names a type for annotations and never runs.
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
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
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


def _is_type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


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
    assert any(m.startswith("qtrain.") for m in real["qtrain.cli.main"])
    # qtrain.config.rules names recipe's classes for its annotations only; recipe imports rules
    assert "qtrain.config.rules" in real["qtrain.config.recipe"]
    assert "qtrain.config.recipe" not in real["qtrain.config.rules"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


# The packages, bottom up. A package imports only packages on lower floors (function-level imports included);
# packages on one floor do not import each other. errors is the one module every package may use.
FLOORS = [
    ("errors",),
    ("config",),       # recipe schema and rules, shipped recipes, the HF config.json reader: torch-free
    ("core",),         # seeding, step state, atomic writes, device, tree walking
    ("quant",),        # group-wise int8, stochastic rounding, their kernels, Int8Linear
    ("optim",),        # the methods: pure functions on tensors behind one Method contract
    ("hf",),           # Hugging Face checkpoints, tokenizers, export
    ("model", "data"),
    ("update",),       # the Updater, release hooks, the captured step
    ("checkpoint", "parallel"),
    ("estimate",),
    ("train",),
    ("cli",),
    ("__main__",),
]
TOP_LEVEL_MODULES_MAX = 8


def package_of(module: str) -> str:
    return module.split(".")[1] if module != "qtrain" else "__init__"


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for mod, edges in import_graph().items():
        src = package_of(mod)
        graph.setdefault(src, set()).update(package_of(e) for e in edges if package_of(e) != src)
    return graph


def test_every_package_has_a_floor():
    placed = {p for floor in FLOORS for p in floor}
    assert set(package_graph()) - {"__init__"} == placed


def test_packages_import_only_lower_floors():
    floor_of = {p: i for i, floor in enumerate(FLOORS) for p in floor}
    bad = [f"{src} -> {dst}" for src, edges in package_graph().items() if src != "__init__"
           for dst in edges if floor_of[dst] >= floor_of[src]]
    assert not bad, bad


def test_no_package_cycle():
    cycle = find_cycle(package_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_package_rule_can_fail():
    graph = {"quant": {"optim"}, "optim": {"quant"}}
    assert find_cycle(graph) == ["optim", "quant", "optim"]


def test_few_modules_at_the_top():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= TOP_LEVEL_MODULES_MAX, top
