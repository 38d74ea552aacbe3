"""The floor plan, checked: the import graph of the package as it installs (dns/ is gateway.dns, tunnel/ is
gateway.tunnel), read from the source with `ast`. No cycles; no module takes another module's private
names; components know nothing of each other; one composition root builds them.

`python -m tests.unit.test_layering` prints the graph (module -> the gateway modules it imports).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {"gateway": "gateway", "dns": "gateway.dns", "tunnel": "gateway.tunnel", "addons": "gateway.addons"}
ROOT = "gateway.service"

#: A component's public face: the modules another component may import (its config section; the tunnel's
#: record model and store contract, which the control API serves; the commands it plugs into `gateway`).
PUBLIC_FACES = frozenset(
    {
        "gateway.engine.config",
        "gateway.dns.config",
        "gateway.tunnel.config",
        "gateway.tunnel.model",
        "gateway.tunnel.store",
        "gateway.tunnel.cli",
        "gateway.tier.config",
        "gateway.tier.cli",
    }
)

#: component -> the module prefixes that are its insides.
COMPONENTS = {
    "engine": ("gateway.engine", "gateway.peek"),
    "dns": ("gateway.dns",),
    "tunnel": ("gateway.tunnel",),
    "api": ("gateway.api", "gateway.openapi"),
    "tier": ("gateway.tier",),
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported gateway module, imported name or None) for every import in `module`."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            base = node.module
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join([*package[: len(package) - node.level + 1], node.module])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, None) if submodule in MODULES else (base, alias.name))
    resolved = []
    for target, name in found:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != module:
            resolved.append((target, name))
    return resolved


IMPORTS = {module: _imports(module, path) for module, path in MODULES.items()}
GRAPH = {module: {target for target, _ in imports} for module, imports in IMPORTS.items()}


def _component(module: str) -> str | None:
    for name, prefixes in COMPONENTS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    return None


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                found.append(sorted([v, *component]))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    return found


def test_the_graph_is_read() -> None:
    # a guard for the guard: the reader finds the imports it is meant to judge
    assert {"gateway.engine.engine", "gateway.dns.server", "gateway.tunnel.service", "gateway.api"} <= GRAPH[ROOT]
    assert "gateway.rules" in GRAPH["gateway.decision"]


def test_no_import_cycles() -> None:
    assert _cycles() == []


def test_no_module_imports_another_modules_private_names() -> None:
    private = [
        f"{module} imports {name} from {target}"
        for module, imports in IMPORTS.items()
        for target, name in imports
        if name is not None and name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


def test_components_know_nothing_of_each_others_insides() -> None:
    """A component may use another's public face (its config section and the like), never its other modules."""
    crossings = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if (mine := _component(module)) is not None
        and _component(target) not in (None, mine)
        and target not in PUBLIC_FACES
    ]
    assert crossings == []


def test_only_the_composition_root_builds_the_components() -> None:
    builders = {
        module
        for module, targets in GRAPH.items()
        if len({_component(t) for t in targets if t not in PUBLIC_FACES} - {None, _component(module)}) >= 2
    }
    assert builders <= {ROOT}


def test_the_core_and_the_engine_do_not_import_dns_or_the_tunnel() -> None:
    assert not {t for t in GRAPH["gateway.config"] if _component(t) in ("dns", "tunnel", "engine")}
    engine = [m for m in GRAPH if _component(m) == "engine"]
    assert engine
    for module in engine:
        assert not {t for t in GRAPH[module] if t.startswith(("gateway.dns", "gateway.tunnel", "gateway.workers"))}


if __name__ == "__main__":
    for module in sorted(GRAPH):
        print(f"{module} -> {', '.join(sorted(GRAPH[module])) or '-'}")
    print("cycles:", _cycles() or "none", file=sys.stderr)
