"""The package's import graph: no cycles between modules, and no import from a lower pipeline stage to a
higher one (DESIGN.md's layering). Every import counts, including the lazy ones inside functions: a lazy import
still ties the lower stage to the higher one."""

from __future__ import annotations

import ast
import pathlib

import balcap_jax

PACKAGE = pathlib.Path(balcap_jax.__file__).parent

# Lowest first. A module may import its own stage and any stage below it. Top-level modules (config, metrics,
# checkpoint) sit between the pipeline stages and the trainer that wires them; the CLIs are on top.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("parallel",),
    ("models",),
    ("data",),
    ("sampling",),
    ("rewards",),
    ("rl",),
    ("config", "default_config", "recipes", "metrics", "checkpoint"),
    ("trainer",),
    ("evaluation",),
    ("tools",),
    ("train", "evaluate"),
)


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> set[str]:
    """Every balcap_jax module `path` imports (`from balcap_jax.x import y` names x.y when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("balcap_jax"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("balcap_jax"))
    return found


def import_graph() -> dict[str, set[str]]:
    # The bare package (its __init__ holds no code) is named by every `from balcap_jax import x`; not an edge.
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py") if module_name(p) != "balcap_jax"}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def layer_of(module: str) -> int:
    parts = module.split(".")
    stage = parts[1] if len(parts) > 1 else ""
    for rank, names in enumerate(LAYERS):
        if stage in names:
            return rank
    raise AssertionError(f"{module}: stage {stage!r} has no place in LAYERS (add it where it belongs)")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    graph = import_graph()
    # A package imports its submodules' names through __init__; that edge is not a dependency of the stage.
    graph = {m: {n for n in deps if not n.startswith(m + ".")} for m, deps in graph.items()}
    assert cycles(graph) == []


def test_no_import_from_a_lower_stage_to_a_higher_one():
    upward = sorted(f"{a} -> {b}" for a, deps in import_graph().items() for b in deps if layer_of(b) > layer_of(a))
    assert upward == []


def test_the_checks_catch_what_they_look_for():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("balcap_jax.models.layers") < layer_of("balcap_jax.tools.parity")
