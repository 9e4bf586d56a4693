"""Pure layout decisions for the coverage plot: labels, tick spacing, figure size, dead-expert text.

Nothing here imports matplotlib, so the choices are cheap to test and the same for any renderer.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from .coverage import ExpertCoverage, LayerCoverage

__all__ = [
    "DeadExpertText",
    "FigureSize",
    "LayerLabels",
    "dead_expert_text",
    "figure_size",
    "input_amax_spread",
    "layer_labels",
    "tick_positions",
]

EXPERT_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
"""Expert counts are powers of two in practice, so expert ticks land on multiples of a power of two."""
LAYER_STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 500)

_MIN_WIDTH_IN, _MAX_WIDTH_IN = 10.0, 20.0
_MIN_HEIGHT_IN, _MAX_HEIGHT_IN = 4.5, 14.0
_INCH_PER_EXPERT = 0.055
_INCH_PER_LAYER = 0.16
_INCH_PER_TEXT_LINE = 0.17


@dataclass(frozen=True, slots=True)
class LayerLabels:
    """Short row labels and the axis label that says what they stand for.

    ``model.layers.0.mlp`` .. ``model.layers.47.mlp`` become ``0`` .. ``47`` with the axis label
    ``MoE layer (model.layers.N.mlp)``; names with nothing in common are kept whole.
    """

    labels: tuple[str, ...]
    axis_label: str


@dataclass(frozen=True, slots=True)
class FigureSize:
    """Figure size in inches and the share of the height the dead-expert text takes."""

    width: float
    height: float
    text_height: float


@dataclass(frozen=True, slots=True)
class DeadExpertText:
    """The dead-expert list shown under the heat map, already truncated.

    Attributes:
        lines: one line per layer with dead experts (at most ``max_lines``, then a ``... and N more`` line).
        dead: experts with 0 tokens in the whole model.
        layers: layers with at least one such expert.
    """

    lines: tuple[str, ...]
    dead: int
    layers: int


def layer_labels(names: Sequence[str]) -> LayerLabels:
    """The dot-separated parts that differ between layer names, joined by dots."""
    parts = [name.split(".") for name in names]
    if len(parts) < 2 or len({len(p) for p in parts}) != 1:
        return LayerLabels(tuple(names), "MoE layer")
    varying = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    if not varying:
        return LayerLabels(tuple(names), "MoE layer")
    labels = tuple(".".join(p[i] for i in varying) for p in parts)
    pattern = ".".join("N" if i in varying else part for i, part in enumerate(parts[0]))
    return LayerLabels(labels, f"MoE layer ({pattern})")


def tick_positions(count: int, max_labels: int, steps: Sequence[int] = EXPERT_STEPS) -> list[int]:
    """Indices ``0, step, 2*step, ...`` below ``count`` with the smallest step in ``steps`` that gives at
    most ``max_labels`` ticks; the last index is added when it is at least half a step past the last tick."""
    if count <= 0:
        return []
    step = next((s for s in steps if -(-count // s) <= max_labels), steps[-1])
    ticks = list(range(0, count, step))
    if count - 1 - ticks[-1] >= max(1, step // 2):
        ticks.append(count - 1)
    return ticks


def figure_size(experts: int, layers: int, text_lines: int) -> FigureSize:
    """Inches that give each expert column and each layer row room, within bounds a screen shows whole."""
    width = min(max(3.5 + _INCH_PER_EXPERT * experts, _MIN_WIDTH_IN), _MAX_WIDTH_IN)
    text = 0.35 + _INCH_PER_TEXT_LINE * text_lines if text_lines else 0.0
    grid = min(max(2.2 + _INCH_PER_LAYER * layers, _MIN_HEIGHT_IN), _MAX_HEIGHT_IN)
    return FigureSize(width=width, height=grid + text, text_height=text)


def _expert_list(experts: Sequence[int], limit: int) -> str:
    shown = ", ".join(map(str, experts[:limit]))
    return shown if len(experts) <= limit else f"{shown} (+{len(experts) - limit} more)"


def dead_expert_text(
    coverage: ExpertCoverage, labels: LayerLabels, max_lines: int = 12, max_experts: int = 16
) -> DeadExpertText:
    """Name the experts that saw 0 tokens, layer by layer, cut to ``max_lines`` x ``max_experts``."""
    dead = [
        (label, layer.dead_experts)
        for label, layer in zip(labels.labels, coverage.layers, strict=True)
        if layer.dead_experts
    ]
    lines = [f"layer {label}: {len(experts)} dead: {_expert_list(experts, max_experts)}" for label, experts in dead]
    if len(lines) > max_lines:
        rest = len(lines) - (max_lines - 1)
        lines = [*lines[: max_lines - 1], f"... and {rest} more layers (full list: quantport_report.json)"]
    total = sum(len(experts) for _, experts in dead)
    return DeadExpertText(lines=tuple(lines), dead=total, layers=len(dead))


def input_amax_spread(layer: LayerCoverage, projection: str) -> float | None:
    """max / median of the per-expert input amax over the experts that saw tokens (>= 1.0), or None
    when the layer has no such record or fewer than two calibrated experts."""
    observed = [a for a in layer.input_amax.get(projection, ()) if a > 0]
    if len(observed) < 2:
        return None
    return max(observed) / statistics.median(observed)
