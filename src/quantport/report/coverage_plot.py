"""The calibration-coverage figure: tokens per expert per MoE layer, drawn with matplotlib.

matplotlib is an optional extra (``pip install 'quantport[plot]'``), imported only when a plot is drawn.
The figure is a bare :class:`matplotlib.figure.Figure` on an Agg canvas: pyplot, the global backend
and rcParams are never touched, so a caller's own matplotlib session is left as it was.

Layout: a heat map (rows: MoE layers, columns: experts, log colour scale, experts with 0 tokens in
red), a bar panel with the dead experts per layer, a panel with the per-layer spread of the
experts' input amax when the coverage records it, a colour bar in tokens, and the dead experts
named under the map (truncated; the full list is in ``quantport_report.json``).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputWriteError, QuantportError
from ..moe_options import MoEInputScales
from .coverage import ExpertCoverage
from .plot_layout import (
    LAYER_STEPS,
    DeadExpertText,
    dead_expert_text,
    figure_size,
    input_amax_spread,
    layer_labels,
    tick_positions,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PlotContext",
    "PlotLibraryMissingError",
    "build_coverage_figure",
    "require_matplotlib",
    "write_coverage_plot",
]

logger = logging.getLogger(__name__)

DEAD_COLOUR = "#e31a1c"
"""Experts with 0 calibration tokens: red, a hue the viridis colour map never reaches."""
_COLOUR_MAP = "viridis"
_PAD_COLOUR = "#d9d9d9"  # cells past a layer's last expert (layers with fewer experts)
_DPI = 100
_FONT = 8
_ANNOTATE_MAX = (16, 32)  # write the count in each cell up to 16 experts x 32 layers
_POLICY_WORDS = {
    MoEInputScales.SHARED.value: "shared input scale (layer max over experts)",
    MoEInputScales.PER_EXPERT.value: "per-expert input scales (0-token experts take the layer max)",
}
_PROJECTIONS = ("gate_up", "down")
_DEAD_PANEL_IN, _SPREAD_PANEL_IN, _COLOUR_BAR_IN = 1.0, 1.6, 0.18
_TEXT_COLUMN_IN = 5.0


class PlotLibraryMissingError(QuantportError):
    """matplotlib, which draws the coverage plot, is not installed."""


@dataclass(frozen=True, slots=True)
class PlotContext:
    """What the title says about the run: the model, the recipe and how many tokens calibrated it."""

    model: str
    recipe: str
    calibration_tokens: int


_MISSING = (
    "the coverage plot needs matplotlib, which is not installed: pip install 'quantport[plot]' "
    "(or drop --coverage-png; the coverage is in quantport_report.json either way)"
)


def require_matplotlib() -> None:
    """Raise :class:`PlotLibraryMissingError` when matplotlib cannot be imported (without importing it)."""
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise PlotLibraryMissingError(_MISSING)


def _import_matplotlib() -> Any:
    try:
        import matplotlib
        import matplotlib.colors
        import matplotlib.figure
        from matplotlib.backends import backend_agg
    except ImportError as exc:
        raise PlotLibraryMissingError(_MISSING) from exc
    return matplotlib, backend_agg


def _token_grid(coverage: ExpertCoverage) -> Any:
    """float [layers, experts]: tokens, NaN past a layer's last expert."""
    import numpy as np

    experts = max(len(layer.tokens) for layer in coverage.layers)
    grid = np.full((len(coverage.layers), experts), np.nan)
    for row, layer in enumerate(coverage.layers):
        grid[row, : len(layer.tokens)] = layer.tokens
    return grid


def _log_norm(matplotlib: Any, grid: Any) -> Any:
    positive = grid[grid > 0]
    low, high = (float(positive.min()), float(positive.max())) if positive.size else (1.0, 10.0)
    if high <= low:
        low = high / 10
    return matplotlib.colors.LogNorm(vmin=low, vmax=high)


def _draw_heatmap(matplotlib: Any, ax: Axes, grid: Any, labels: tuple[str, ...], axis_label: str) -> Any:
    import numpy as np

    layers, experts = grid.shape
    cmap = matplotlib.colormaps[_COLOUR_MAP].with_extremes(bad=(0, 0, 0, 0))
    ax.set_facecolor(_PAD_COLOUR)
    image = ax.imshow(
        np.ma.masked_where(~(grid > 0), grid),
        cmap=cmap,
        norm=_log_norm(matplotlib, grid),
        aspect="auto",
        interpolation="nearest",
    )
    dead = np.where(grid == 0, 1.0, np.nan)
    ax.imshow(dead, cmap=matplotlib.colors.ListedColormap([DEAD_COLOUR]), aspect="auto", interpolation="nearest")
    _cell_ticks(ax, experts, layers, labels, axis_label)
    if experts <= _ANNOTATE_MAX[0] and layers <= _ANNOTATE_MAX[1]:
        _annotate_cells(ax, grid, image)
    return image


def _cell_ticks(ax: Axes, experts: int, layers: int, labels: tuple[str, ...], axis_label: str) -> None:
    box = ax.get_position()
    fig_w, fig_h = ax.figure.get_size_inches()
    max_x = max(4, int(box.width * fig_w * 72 / (_FONT * 2.8)))
    max_y = max(4, int(box.height * fig_h * 72 / (_FONT * 1.6)))
    xticks = tick_positions(experts, max_x)
    yticks = tick_positions(layers, max_y, LAYER_STEPS)
    ax.set_xticks(xticks, [str(t) for t in xticks], fontsize=_FONT)
    ax.set_yticks(yticks, [labels[t] for t in yticks], fontsize=_FONT)
    ax.set_xlabel(f"expert (0-{experts - 1})", fontsize=_FONT + 1)
    ax.set_ylabel(axis_label, fontsize=_FONT + 1)
    ax.tick_params(which="minor", length=0)
    if layers <= 80:  # thin white lines between rows make a row easy to follow across a wide map
        ax.set_yticks([r - 0.5 for r in range(1, layers)], minor=True)
        ax.grid(which="minor", axis="y", color="white", linewidth=0.6)
    if experts <= 64:
        ax.set_xticks([c - 0.5 for c in range(1, experts)], minor=True)
        ax.grid(which="minor", axis="x", color="white", linewidth=0.6)


def _annotate_cells(ax: Axes, grid: Any, image: Any) -> None:
    import math

    for (row, col), value in _cells(grid):
        if math.isnan(value):
            continue
        bright = value > 0 and sum(image.cmap(image.norm(value))[:3]) > 1.6
        ax.text(
            col,
            row,
            f"{int(value)}",
            ha="center",
            va="center",
            fontsize=_FONT - 1,
            color="black" if bright else "white",
        )


def _cells(grid: Any) -> list[tuple[tuple[int, int], float]]:
    return [((r, c), float(grid[r, c])) for r in range(grid.shape[0]) for c in range(grid.shape[1])]


def _draw_dead_counts(ax: Axes, coverage: ExpertCoverage) -> None:
    counts = [len(layer.dead_experts) for layer in coverage.layers]
    ax.barh(range(len(counts)), counts, height=0.8, color=DEAD_COLOUR)
    ax.set_title("experts with\n0 tokens", fontsize=_FONT + 1, color=DEAD_COLOUR)
    ax.set_xlim(0, max(1, max(counts)) * 1.15)
    ax.xaxis.get_major_locator().set_params(integer=True, nbins=3)
    ax.tick_params(labelsize=_FONT, labelleft=False)
    ax.grid(axis="x", color="#cccccc", linewidth=0.5)
    if not any(counts):
        ax.text(0.5, 0.5, "none", transform=ax.transAxes, ha="center", va="center", fontsize=_FONT + 1)


def _draw_spread(ax: Axes, coverage: ExpertCoverage) -> None:
    rows = range(len(coverage.layers))
    for projection, marker in zip(_PROJECTIONS, ("o", "s"), strict=True):
        spread = [input_amax_spread(layer, projection) for layer in coverage.layers]
        points = [(s, r) for s, r in zip(spread, rows, strict=True) if s is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker=marker, markersize=3, linewidth=0.8, label=projection)
    ax.set_title("input amax spread\n(max / median, experts)", fontsize=_FONT + 1)
    ax.axvline(1.0, color="#999999", linewidth=0.6)
    ax.tick_params(labelsize=_FONT, labelleft=False)
    ax.grid(axis="x", color="#cccccc", linewidth=0.5)
    ax.legend(fontsize=_FONT - 1, loc="best", title="input of", title_fontsize=_FONT - 1)


def _has_spread(coverage: ExpertCoverage) -> bool:
    return any(input_amax_spread(layer, p) is not None for layer in coverage.layers for p in _PROJECTIONS)


def _title(coverage: ExpertCoverage, context: PlotContext, experts: int) -> str:
    policy = _POLICY_WORDS.get(coverage.input_scales, coverage.input_scales)
    return (
        f"Calibration coverage of {context.model}\n"
        f"recipe {context.recipe}, {context.calibration_tokens:,} calibration tokens, "
        f"{experts} experts x {len(coverage.layers)} MoE layers, statistics: {coverage.calibration} tokens\n"
        f"uncalibrated-expert policy: {policy}"
    )


def _draw_dead_text(ax: Axes, text: DeadExpertText, columns: int, layers: int) -> None:
    ax.axis("off")
    heading = f"Experts that saw no calibration token (red): {text.dead} in {text.layers} of {layers} layers"
    ax.annotate(heading, (0, 1), xycoords="axes fraction", va="top", fontsize=_FONT + 1, color=DEAD_COLOUR)
    ax.annotate(
        "their input scales come from the uncalibrated-expert policy in the title",
        (0, 1),
        xycoords="axes fraction",
        xytext=(0, -_FONT * 1.6),
        textcoords="offset points",
        va="top",
        fontsize=_FONT,
    )
    per_column = -(-len(text.lines) // columns)
    for column in range(columns):
        ax.annotate(
            "\n".join(text.lines[column * per_column : (column + 1) * per_column]),
            (column / columns, 1),
            xycoords="axes fraction",
            xytext=(0, -_FONT * 3.6),
            textcoords="offset points",
            va="top",
            fontsize=_FONT,
            family="monospace",
        )


def _text_columns(width_in: float) -> int:
    return max(1, int(width_in // _TEXT_COLUMN_IN))


def build_coverage_figure(coverage: ExpertCoverage, context: PlotContext, max_text_rows: int = 12) -> Figure:
    """The coverage figure (not saved); raises :class:`PlotLibraryMissingError` without matplotlib.

    Dead experts are listed in up to ``max_text_rows`` rows per text column (as many columns as the
    figure's width holds), 8 experts per layer when there are several columns, 16 otherwise.
    """
    if not coverage.layers:
        raise ValueError("the model has no MoE layers: nothing to draw")
    matplotlib, backend_agg = _import_matplotlib()
    grid = _token_grid(coverage)
    layers, experts = grid.shape
    labels = layer_labels([layer.layer for layer in coverage.layers])
    columns = _text_columns(figure_size(experts, layers, 0).width)
    text = dead_expert_text(coverage, labels, max_lines=max_text_rows * columns, max_experts=8 if columns > 1 else 16)
    rows_used = -(-len(text.lines) // columns)
    size = figure_size(experts, layers, rows_used + 2 if text.lines else 0)
    fig = matplotlib.figure.Figure(figsize=(size.width, size.height), dpi=_DPI, layout="constrained")
    backend_agg.FigureCanvasAgg(fig)
    side = [_DEAD_PANEL_IN, _SPREAD_PANEL_IN] if _has_spread(coverage) else [_DEAD_PANEL_IN]
    heat_width = size.width - sum(side) - _COLOUR_BAR_IN - 1.2
    grid_spec = fig.add_gridspec(
        2 if text.lines else 1,
        2 + len(side),
        width_ratios=[heat_width, *side, _COLOUR_BAR_IN],
        height_ratios=[size.height - size.text_height, size.text_height] if text.lines else None,
    )
    heat = fig.add_subplot(grid_spec[0, 0])
    image = _draw_heatmap(matplotlib, heat, grid, labels.labels, labels.axis_label)
    _draw_dead_counts(fig.add_subplot(grid_spec[0, 1], sharey=heat), coverage)
    if len(side) == 2:
        _draw_spread(fig.add_subplot(grid_spec[0, 2], sharey=heat), coverage)
    colour_bar = fig.colorbar(image, cax=fig.add_subplot(grid_spec[0, -1]))
    colour_bar.set_label("calibration tokens per expert (log scale)", fontsize=_FONT + 1)
    colour_bar.ax.tick_params(labelsize=_FONT)
    if text.lines:
        _draw_dead_text(fig.add_subplot(grid_spec[1, :]), text, columns, layers)
    fig.suptitle(_title(coverage, context, experts), fontsize=_FONT + 3)
    return fig


def write_coverage_plot(coverage: ExpertCoverage, path: str | Path, context: PlotContext) -> Path:
    """Draw the coverage figure into ``path`` (PNG) and return the path."""
    figure = build_coverage_figure(coverage, context)
    path = Path(path)
    try:
        figure.savefig(path, format="png", dpi=_DPI)
    except OSError as exc:
        raise OutputWriteError(f"cannot write the coverage plot {path}: {exc.strerror or exc}") from exc
    logger.info("coverage plot written to %s", path)
    return path
