"""The package's shape: layered packages (each imports only the floors below it), no import circle
(deferred and type-only imports included), one strategy registry."""

from __future__ import annotations

import ast
from pathlib import Path

from tau2cl.cl.strategies.base import CLStrategy
from tau2cl.cl.strategies.registry import CL_ALGORITHMS, STRATEGIES, strategy_class
from tau2cl.config import GRPOConfig

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "tau2cl"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module → the tau2cl modules it imports anywhere in its text (functions and TYPE_CHECKING too)."""
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports the module pkg.mod when there is one
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


# The floors, lowest first. A unit is a subpackage or a module directly under tau2cl ("tau2cl" is the
# package's own __init__); a unit imports only units on lower floors, or itself.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors", "constants"),
    ("distributed",),
    ("runs",),
    ("env",),
    ("agent",),
    ("rl",),
    ("cl",),
    ("config",),
    ("evaluation",),
    ("reporting",),
    ("recipe",),
    ("trainer",),
    ("train", "flag_reference"),
    ("cli",),
    ("__main__", "tau2cl"),
)


def unit_of(module: str) -> str:
    """tau2cl.agent.engine → agent; tau2cl.errors → errors; tau2cl → tau2cl."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def upward_imports(graph: dict[str, set[str]], floors=FLOORS) -> list[str]:
    """Every import of a unit on the same or a higher floor than the importer's (its own unit aside)."""
    floor = {unit: level for level, units in enumerate(floors) for unit in units}
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = unit_of(module), unit_of(target)
            if a != b and floor[b] >= floor[a]:
                found.append(f"{module} ({a}) imports {target} ({b})")
    return found


def test_upward_imports_are_found_and_same_floor_ones_too():
    graph = {"tau2cl.env.x": {"tau2cl.agent.y", "tau2cl.errors"}, "tau2cl.agent.y": {"tau2cl.env.x"},
             "tau2cl.errors": {"tau2cl.constants"}}
    assert upward_imports(graph) == [
        "tau2cl.env.x (env) imports tau2cl.agent.y (agent)",
        "tau2cl.errors (errors) imports tau2cl.constants (constants)",
    ]
    assert upward_imports({"tau2cl.agent.y": {"tau2cl.env.x", "tau2cl.agent.z"}}) == []


def test_every_unit_of_the_package_has_a_floor():
    units = {unit_of(m) for m in import_graph()}
    assert units == {u for floor in FLOORS for u in floor}


def test_no_package_imports_one_above_it():
    assert upward_imports(import_graph()) == []


def test_find_cycle_sees_a_circle_and_its_absence():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_reads_deferred_and_type_only_imports(tmp_path):
    pkg = tmp_path / "tau2cl"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from tau2cl import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tau2cl.a import f\n")
    graph = import_graph(pkg)
    assert graph["tau2cl.a"] == {"tau2cl.b"} and graph["tau2cl.b"] == {"tau2cl.a"}
    assert find_cycle(graph) == ["tau2cl.a", "tau2cl.b", "tau2cl.a"]


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 30  # the whole package was read
    assert find_cycle(graph) is None


def test_every_registered_strategy_is_a_strategy_under_its_own_name():
    assert CL_ALGORITHMS == tuple(STRATEGIES)
    for name in CL_ALGORITHMS:
        cls = strategy_class(name)
        assert issubclass(cls, CLStrategy) and cls.name == name


def test_cl_algorithm_choices_are_the_registry():
    assert GRPOConfig.__dataclass_fields__["cl_algorithm"].metadata["choices"] == CL_ALGORITHMS
