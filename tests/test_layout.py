"""The package layout holds: layers import only downwards, no import cycle, few modules at the top.

Read from the source with `ast` (every import, also inside functions), so a lazy import that breaks a
rule fails here too. The layer order is the one README's Layout section states.
"""
from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
# Low to high, and what each layer may import besides itself (each subpackage's docstring says the same).
_BASE = ("runner.spec", "runner.units")
_LOW = _BASE + ("runner.data", "runner.memory", "runner.model", "policies", "runner.kv")
ALLOWED: dict[str, tuple[str, ...]] = {
    "runner.spec": (), "runner.units": (),
    "runner.data": _BASE, "runner.memory": _BASE, "runner.model": _BASE, "policies": (),
    "runner.kv": _BASE + ("runner.model", "policies"),
    "runner.engines": _LOW,
    "runner.offload": _LOW + ("runner.engines",),
    "runner.plan": _LOW + ("runner.engines", "runner.offload"),
    "runner.eval": _LOW + ("runner.engines",),
    "runner": _LOW + ("runner.engines", "runner.offload", "runner.plan", "runner.eval"),  # the run's face
}
LAYERS = tuple(ALLOWED)
FACE_MAX_MODULES = 12  # modules directly in runner/ (the run's face), __init__ included


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    """The layer `module` belongs to: the longest entry of LAYERS that names it or a package above it."""
    return max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)


def _imports(path: Path) -> set[str]:
    """Project modules `path` imports: `from a.b import c` counts a.b.c when that is a module, else a.b."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m.split(".")[0] in ("runner", "policies")}


FILES = sorted(p for d in ("runner", "policies") for p in (ROOT / d).rglob("*.py"))
MODULES = {_module_name(p) for p in FILES}
GRAPH = {_module_name(p): _imports(p) for p in FILES}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b` for every import of a layer that `a`'s layer may not import."""
    return [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a])
            if _layer(b) != _layer(a) and _layer(b) not in ALLOWED[_layer(a)]]


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` as a path that ends where it starts, or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(m: str, path: list[str]) -> list[str]:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n == m or n not in graph:
                continue
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return []


def test_imports_go_down_the_layers() -> None:
    assert upward_imports(GRAPH) == []


def test_no_import_cycle() -> None:
    assert find_cycle(GRAPH) == []


def test_the_face_stays_small() -> None:
    top = sorted(p.name for p in (ROOT / "runner").glob("*.py"))
    assert len(top) <= FACE_MAX_MODULES, top


def test_every_layer_has_modules() -> None:
    assert {_layer(m) for m in MODULES} == set(LAYERS)


def test_the_allowed_imports_only_point_down() -> None:
    """ALLOWED is itself layered: a layer may import only layers listed before it."""
    for i, layer in enumerate(LAYERS):
        assert set(ALLOWED[layer]) <= set(LAYERS[:i]), layer


def test_the_checks_find_what_they_look_for() -> None:
    """Both checks are live: an upward import and a cycle in a made-up graph are reported."""
    assert upward_imports({"runner.model.config": {"runner.offload.executor"}}) == \
        ["runner.model.config -> runner.offload.executor"]
    assert upward_imports({"runner.run_job": {"runner.model.config"}}) == []
    assert upward_imports({"runner.data.outputs": {"runner.memory.pools"}}) == \
        ["runner.data.outputs -> runner.memory.pools"]  # lower, but not allowed: data/ imports only the base
    cyclic = {"runner.kv.a": {"runner.kv.b"}, "runner.kv.b": {"runner.kv.c"}, "runner.kv.c": {"runner.kv.a"}}
    assert find_cycle(cyclic) == ["runner.kv.a", "runner.kv.b", "runner.kv.c", "runner.kv.a"]
    assert find_cycle({"runner.kv.a": {"runner.kv.b"}, "runner.kv.b": set()}) == []
    # the real graph is read: lazy imports inside functions count too
    assert "runner.model.ops" in GRAPH["runner.model.layers"]
    assert "runner.kv.quant" in GRAPH["runner.kv.store"]
