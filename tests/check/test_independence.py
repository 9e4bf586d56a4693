"""The checker shares no code with the exporter: only the numeric formats, the dialects' vocabularies, the family
descriptors and the reader."""

from __future__ import annotations

import ast
from pathlib import Path

import quantport.check

ALLOWED_OUTSIDE = (
    "quantport.formats",
    "quantport.dialects",
    "quantport.arch.experts",
    "quantport.arch.family",
    "quantport.arch.engines",
    "quantport.check",
    "quantport.read",
    "quantport.errors",
    "quantport.memory.gc_pause",
)
"""Pure numerics and their descriptors, the dialects' vocabularies, model-family and engine descriptors (data), the
shared file reader, the error classes and the garbage-collector pause (no numerics)."""
SOURCES = sorted(Path(quantport.check.__file__).parent.rglob("*.py")) + [
    Path(quantport.check.__file__).parents[1] / "inspect_checkpoint.py"
]


def _absolute(module: str, node: ast.ImportFrom, file: Path) -> str:
    if not node.level:
        return node.module or ""
    package = file.relative_to(Path(quantport.check.__file__).parents[2]).with_suffix("").parts[: -node.level]
    return ".".join(package + ((node.module,) if node.module else ()))


def test_only_allowed_quantport_imports():
    for file in SOURCES:
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [_absolute(node.module or "", node, file)]
            for name in names:
                if name.startswith("quantport"):
                    assert name.startswith(ALLOWED_OUTSIDE) or name == "quantport.inspect_checkpoint", (
                        f"{file.name} imports {name}"
                    )


def test_rule_files_stay_small():
    for file in SOURCES:
        assert len(file.read_text().splitlines()) <= 400, file
