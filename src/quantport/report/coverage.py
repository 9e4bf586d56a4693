"""Expert coverage: calibration tokens per expert per MoE layer."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ExpertCoverage", "LayerCoverage"]


@dataclass(frozen=True)
class LayerCoverage:
    """Tokens per expert of one MoE layer.

    Attributes:
        layer: the MoE block's module name, e.g. ``model.layers.3.mlp``.
        tokens: calibration tokens routed to each expert, one entry per expert.
        input_amax: projection (``gate_up``, ``down``) -> max |input| each expert saw in calibration
            (0.0 for an expert that saw nothing), before the uncalibrated-expert policy filled gaps;
            empty when the pipeline did not record it.
    """

    layer: str
    tokens: tuple[int, ...]
    input_amax: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    @property
    def dead_experts(self) -> list[int]:
        return [e for e, n in enumerate(self.tokens) if n == 0]


@dataclass
class ExpertCoverage:
    """Coverage of every MoE layer, with the policy that filled the gaps."""

    input_scales: str
    calibration: str
    layers: list[LayerCoverage] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        counts = [n for layer in self.layers for n in layer.tokens]
        if not counts:
            return {"experts": 0}
        return {
            "experts": len(counts),
            "experts_without_tokens": sum(1 for n in counts if n == 0),
            "min_tokens": min(counts),
            "median_tokens": statistics.median(counts),
            "max_tokens": max(counts),
        }

    def summary_lines(self) -> list[str]:
        """A few human-readable lines for the CLI."""
        s = self.summary()
        if not s["experts"]:
            return []
        lines = [
            f"{s['experts']} experts in {len(self.layers)} MoE layers; tokens per expert "
            f"min {s['min_tokens']} / median {s['median_tokens']:g} / max {s['max_tokens']}; "
            f"input scales: {self.input_scales}; calibration: {self.calibration}",
        ]
        dead = [(layer.layer, layer.dead_experts) for layer in self.layers if layer.dead_experts]
        if dead:
            lines.append(f"{s['experts_without_tokens']} experts saw no calibration tokens (given scales by policy):")
            lines += [f"  {name}: experts {', '.join(map(str, experts))}" for name, experts in dead[:10]]
            if len(dead) > 10:
                lines.append(f"  ... and {len(dead) - 10} more layers (see quantport_report.json)")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "input_scales": self.input_scales,
            "calibration": self.calibration,
            "summary": self.summary(),
            "layers": {layer.layer: list(layer.tokens) for layer in self.layers},
            "experts_without_tokens": {layer.layer: layer.dead_experts for layer in self.layers if layer.dead_experts},
        }
