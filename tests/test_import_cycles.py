"""No import cycles between quantport's modules at import time (module-level imports; imports inside
functions and under ``if TYPE_CHECKING`` do not run at import)."""

from __future__ import annotations

import ast
from pathlib import Path

import quantport

SRC = Path(quantport.__file__).parent


def _name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    deps.add(full if full in modules else target)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


def _on_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every module that imports itself through other modules."""
    return sorted(m for m in graph if m in _reachable(graph, m))


def test_no_import_cycles():
    graph = _graph()
    assert _on_cycles(graph) == []


def test_the_cycles_named_in_issue_14_are_gone():
    graph = _graph()
    assert "quantport" not in graph["quantport.export"]
    assert "quantport.check.rules.moe" not in graph["quantport.check.rules.fused_experts"]
    codec_modules = [m for m in graph if "quantport.schemes.registry" in graph[m]]
    assert {"quantport.formats.fp8", "quantport.formats.nvfp4", "quantport.formats.mx"} < set(codec_modules)
    assert all("quantport.schemes" not in graph[m] for m in codec_modules)  # codec modules never import the package
