"""The MoE options of :func:`quantport.quantize` as closed vocabularies (torch-free, for the command line).

What each policy does is described in :mod:`quantport.calibrate.moe_policy`.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["MoECalibration", "MoEInputScales"]


class MoEInputScales(str, Enum):
    """Input-scale policy for experts (see :mod:`quantport.calibrate.moe_policy`)."""

    SHARED = "shared"
    """One input scale per projection per layer: the max over the layer's experts."""
    PER_EXPERT = "per-expert"
    """One input scale per expert; an expert without tokens takes its calibrated siblings' max."""

    def __str__(self) -> str:
        return self.value


class MoECalibration(str, Enum):
    """Which tokens feed each expert's statistics (see :mod:`quantport.calibrate.moe_policy`)."""

    ROUTED = "routed"
    """What the router sends to each expert."""
    ALL_EXPERTS = "all-experts"
    """Every token through every expert (the model's output keeps the real routing)."""

    def __str__(self) -> str:
        return self.value
