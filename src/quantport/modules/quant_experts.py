"""ExpertsQuantizer: the quantization record of one fused experts module, attached to it.

The record holds what quantization decided for the module (codec, weight amax, the input amax the
uncalibrated-expert policy chose) and routes the module's forward by mode to one of two single-role
objects:

* calibrate: :class:`~quantport.modules.expert_calibration.ExpertsCalibrator` (statistics);
* simulate: :class:`~quantport.modules.expert_simulation.ExpertsSimulator` (fake quantization from the
  dequantized weights and the input scales).

The weights both the simulation and the exporters use come from one place,
:mod:`quantport.modules.expert_weights` (the exporters' chunked tensors with input scales:
:mod:`quantport.export.expert_tensors`), so the two decode to the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..arch.experts import ExpertLayout, MoEBlock
from ..schemes import SchemeCodec
from .attach import attach_forward, class_forward, detach_forward
from .expert_calibration import ExpertsCalibrator
from .expert_simulation import PROJECTIONS, ExpertsSimulator
from .expert_weights import dequantized_experts, expert_weight_amax
from .quant_linear import QuantMode

__all__ = [
    "PROJECTIONS",
    "ExpertsQuantizer",
    "expert_weight_amax",
    "experts_quantizer_of",
    "install_experts_quantizer",
    "uninstall_experts_quantizer",
]


class ExpertsQuantizer:
    """Quantization record of one experts module.

    Attributes:
        block: the MoE block (names, experts module, layout).
        codec: the Linear scheme's codec, applied to each expert's 2-D projections.
        calibrator: the module's calibration statistics (``tokens``, ``input_amax``).
        export_input_amax: projection -> fp32 [E] amax used for ``input_scale`` after the
            uncalibrated-expert policy (set by :func:`quantport.calibrate.moe_policy.apply_input_policy`).
        weight_amax: projection -> fp32 [E] per-tensor weight amax per expert (gate and up share one).
        mode: current :class:`QuantMode`.
    """

    def __init__(self, block: MoEBlock, codec: SchemeCodec, weight_amax: dict[str, torch.Tensor] | None = None) -> None:
        self.block = block
        self.codec = codec
        self.calibrator = ExpertsCalibrator(block)
        self.export_input_amax: dict[str, torch.Tensor] | None = None
        self.weight_amax = expert_weight_amax(block) if weight_amax is None else weight_amax
        self.mode = QuantMode.OFF
        self._simulator: ExpertsSimulator | None = None
        self._simulated_weights: dict[str, torch.Tensor] | None = None

    @property
    def layout(self) -> ExpertLayout:
        return self.block.layout

    @property
    def tokens(self) -> torch.Tensor:
        """int64 [E] calibration tokens routed to each expert."""
        return self.calibrator.tokens

    @property
    def input_amax(self) -> dict[str, torch.Tensor]:
        """projection -> fp32 [E] max |input| per expert, as observed."""
        return self.calibrator.input_amax

    @property
    def all_experts_statistics(self) -> bool:
        return self.calibrator.all_experts

    @all_experts_statistics.setter
    def all_experts_statistics(self, value: bool) -> None:
        self.calibrator.all_experts = value

    def input_scale(self, projection: str) -> torch.Tensor | None:
        """fp32 [E] ``input_scale`` per expert (None for weight-only / dynamic schemes)."""
        if not self.codec.static_input_scale:
            return None
        if self.export_input_amax is None:
            raise RuntimeError(f"{self.block.experts_name}: no calibrated input amax; run calibration first")
        return self.codec.input_scale(self.export_input_amax[projection])

    def _input_scales(self) -> dict[str, torch.Tensor] | None:
        if not self.codec.static_input_scale:
            return None
        return {projection: self.input_scale(projection) for projection in PROJECTIONS}  # type: ignore[misc]

    def simulated_parameters(self) -> dict[str, torch.Tensor]:
        """``gate_up_proj`` and ``down_proj`` as dequantize(quantize(.)) in the model's own layout."""
        if self._simulator is not None:
            return self._simulator.weights
        if self._simulated_weights is None:
            self._simulated_weights = dequantized_experts(self.block, self.codec, self.weight_amax)
        return self._simulated_weights

    def weights_changed(self) -> None:
        """The module's expert weights were replaced (by a calibration algorithm): drop the cached simulation."""
        self._simulator = None
        self._simulated_weights = None

    def simulator(self) -> ExpertsSimulator:
        """The module's :class:`ExpertsSimulator` (built on first use, then kept)."""
        if self._simulator is None:
            weights = self.simulated_parameters()
            self._simulator = ExpertsSimulator(self.block, self.codec, weights, self._input_scales())
        return self._simulator

    def drop_simulation(self) -> None:
        """Forget the simulated weights (one dequantized copy of the experts), e.g. when the layer's own
        weights are freed."""
        self._simulator = None
        self._simulated_weights = None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.mode is QuantMode.CALIBRATE:
            return self.calibrator.forward(*args, **kwargs)
        if self.mode is QuantMode.SIMULATE:
            return self.simulator().forward(*args, **kwargs)
        return class_forward(self.block.experts)(*args, **kwargs)


def install_experts_quantizer(
    block: MoEBlock, codec: SchemeCodec, weight_amax: dict[str, torch.Tensor] | None = None
) -> ExpertsQuantizer:
    """Attach an :class:`ExpertsQuantizer` to ``block.experts`` and route its forward through it.

    ``weight_amax``: :func:`expert_weight_amax` of the block when the caller already computed it.
    """
    existing = experts_quantizer_of(block.experts)
    if existing is not None:
        return existing
    quantizer = ExpertsQuantizer(block, codec, weight_amax)
    attach_forward(block.experts, quantizer.forward)
    block.experts.__dict__[_RECORD] = quantizer
    return quantizer


_RECORD = "_quantport_experts"


def experts_quantizer_of(module: nn.Module) -> ExpertsQuantizer | None:
    """The experts module's quantizer, if one is installed."""
    return module.__dict__.get(_RECORD)


def uninstall_experts_quantizer(module: nn.Module) -> None:
    """Drop the experts module's quantizer and give the module its own forward back."""
    if module.__dict__.pop(_RECORD, None) is not None:
        detach_forward(module)
