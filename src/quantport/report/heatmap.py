"""A PNG heat map of tokens per expert (rows: MoE layers, columns: experts), with no plotting library."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

from .coverage import ExpertCoverage

__all__ = ["write_coverage_heatmap"]

_CELL = 12
_DEAD = (200, 30, 30)  # experts without tokens are drawn red


def _colour(value: float) -> tuple[int, int, int]:
    """0 -> white, 1 -> dark blue (log-scaled token counts)."""
    dark = (20, 60, 140)
    return tuple(int(255 * (1 - value) + d * value) for d in dark)  # type: ignore[return-value]


def _png(width: int, height: int, rows: list[bytes]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def write_coverage_heatmap(coverage: ExpertCoverage, path: str | Path) -> Path:
    """Write ``path`` (PNG): one row of cells per MoE layer, one column per expert."""
    if not coverage.layers:
        raise ValueError("the model has no MoE layers: nothing to draw")
    experts = max(len(layer.tokens) for layer in coverage.layers)
    top = max(max(layer.tokens) for layer in coverage.layers) or 1
    rows: list[bytes] = []
    for layer in coverage.layers:
        cells = []
        for n in layer.tokens:
            cells.append(_DEAD if n == 0 else _colour(math.log1p(n) / math.log1p(top)))
        cells += [(255, 255, 255)] * (experts - len(cells))
        line = b"".join(bytes(c) * _CELL for c in cells)
        rows += [line] * _CELL
    path = Path(path)
    path.write_bytes(_png(experts * _CELL, len(coverage.layers) * _CELL, rows))
    return path
