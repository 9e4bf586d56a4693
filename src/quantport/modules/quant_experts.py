"""ExpertsQuantizer: the quantization record of one fused experts module, attached to it.

The record holds what quantization decided for the module (codec, weight amax, the input amax the
uncalibrated-expert policy chose) and routes the module's forward by mode to one of two single-role
objects:

* calibrate: :class:`~quantport.modules.expert_calibration.ExpertsCalibrator` (statistics);
* simulate: :class:`~quantport.modules.expert_simulation.ExpertsSimulator` (fake quantization from the
  dequantized weights and the input scales).

Weight quantization of a range of experts (:meth:`ExpertsQuantizer.quantized_experts`, in chunks of
:meth:`~ExpertsQuantizer.expert_chunks`) is what both the simulation's weights and the exporters'
tensors come from, so the two decode to the same numbers. Numerics follow the layout's
:class:`~quantport.arch.experts.ExpertScales`, never its on-disk naming.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..arch.experts import ExpertLayout, ExpertScales, MoEBlock
from ..schemes import SchemeCodec, quantizes_stacks
from .attach import attach_forward, class_forward, detach_forward
from .expert_calibration import ExpertsCalibrator
from .expert_simulation import PROJECTIONS, ExpertsSimulator
from .quant_linear import QuantMode

__all__ = [
    "PROJECTIONS",
    "ExpertsQuantizer",
    "expert_weight_amax",
    "experts_quantizer_of",
    "install_experts_quantizer",
    "uninstall_experts_quantizer",
]

STACK_BYTES = 64 << 20  # fp32 bytes of expert weights quantized in one call on the CPU
STACK_BYTES_CUDA = 1 << 30  # and on a GPU


def expert_weight_amax(block: MoEBlock) -> dict[str, torch.Tensor]:
    """Projection -> fp32 [E] per-expert weight amax, from the weights themselves (valid with or
    without calibration tokens; NaN or inf when the weights hold them).

    Gate and up share one amax per expert (engines fuse them); a layout whose engine reads one scale
    per projection (:attr:`ExpertScales.ONE_PER_PROJECTION`) shares one amax across all experts.
    """
    experts = block.experts
    amax = {
        "gate_up": experts.gate_up_proj.detach().abs().amax(dim=(-1, -2)).float(),
        "down": experts.down_proj.detach().abs().amax(dim=(-1, -2)).float(),
    }
    if block.layout.scales is ExpertScales.ONE_PER_PROJECTION:
        amax = {p: a.amax().expand_as(a).clone() for p, a in amax.items()}
    return amax


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
        self._stored_input_scales: dict[str, torch.Tensor] | None = None

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

    # --- weights -------------------------------------------------------------------------------------------

    def expert_weights(self, expert: int | slice) -> dict[str, torch.Tensor]:
        """``[out, in]`` weights of expert ``expert`` (``[n, out, in]`` for a slice): gate, up, down.

        Layouts with one scale per projection are quantized from fp32 (one rounding of ``w / scale``), as
        ModelOpt quantizes its fused 3-D experts; per-expert scales quantize in the model dtype like a Linear.
        """
        experts, layout = self.block.experts, self.layout
        gate_up = experts.gate_up_proj[expert].detach()
        down = experts.down_proj[expert].detach()
        if layout.scales is ExpertScales.ONE_PER_PROJECTION:
            gate_up, down = gate_up.float(), down.float()
        return {"gate": layout.gate(gate_up), "up": layout.up(gate_up), "down": layout.down(down)}

    def expert_chunks(self) -> list[range]:
        """Consecutive experts quantized together by :meth:`quantized_experts`: all of a chunk's weights
        in fp32 fit ``STACK_BYTES`` (more on a GPU); one expert per chunk for codecs without stacks."""
        n = self.block.num_experts
        size = 1
        if quantizes_stacks(self.codec):
            experts = self.block.experts
            per_expert = 4 * (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel())
            budget = STACK_BYTES_CUDA if experts.down_proj.is_cuda else STACK_BYTES
            size = max(1, min(n, budget // per_expert))
        return [range(start, min(start + size, n)) for start in range(0, n, size)]

    def quantized_experts(
        self, experts: range, device: torch.device | str | None = None
    ) -> list[dict[str, dict[str, torch.Tensor]]]:
        """Exported tensors (projection -> suffix -> tensor) of each expert of ``experts`` (consecutive),
        optionally moved to ``device``. Codecs that take stacks quantize each projection of the range in
        one call (one kernel launch and one device-to-host copy per tensor kind, not one per expert)."""
        if len(experts) > 1 and not quantizes_stacks(self.codec):
            return [self.quantized_experts(range(e, e + 1), device)[0] for e in experts]
        index = slice(experts.start, experts.stop) if len(experts) > 1 else experts.start
        out: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in experts]
        input_scales = {projection: self.input_scale(projection) for projection in PROJECTIONS}
        for name, weight in self.expert_weights(index).items():
            projection = "down" if name == "down" else "gate_up"
            tensors = self.codec.quantize_weight(weight, self.weight_amax[projection][index])
            scale = input_scales[projection]
            if scale is not None:
                tensors["input_scale"] = scale[index]
            if device is not None:
                tensors = {k: v.to(device) for k, v in tensors.items()}
            for i in range(len(experts)):
                out[i][name] = {k: v[i] for k, v in tensors.items()} if len(experts) > 1 else tensors
        return out

    def input_scale(self, projection: str) -> torch.Tensor | None:
        """fp32 [E] ``input_scale`` per expert (None for weight-only / dynamic schemes)."""
        if not self.codec.static_input_scale:
            return None
        if self._stored_input_scales is not None:
            return self._stored_input_scales[projection]
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
            self._simulated_weights = self._dequantized_weights()
        return self._simulated_weights

    def _dequantized_weights(self) -> dict[str, torch.Tensor]:
        dtype = self.block.experts.down_proj.dtype
        gates, ups, downs = [], [], []
        for tensors in (t for chunk in self.expert_chunks() for t in self.quantized_experts(chunk)):
            gates.append(self.codec.dequantize_weight(tensors["gate"], dtype))
            ups.append(self.codec.dequantize_weight(tensors["up"], dtype))
            downs.append(self.codec.dequantize_weight(tensors["down"], dtype))
        layout = self.layout
        return {
            "gate_up": layout.fuse(torch.stack(gates), torch.stack(ups)).contiguous(),
            "down": layout.unorient_down(torch.stack(downs)).contiguous(),
        }

    def simulator(self) -> ExpertsSimulator:
        """The module's :class:`ExpertsSimulator` (built on first use, then kept)."""
        if self._simulator is None:
            weights = self.simulated_parameters()
            self._simulator = ExpertsSimulator(self.block, self.codec, weights, self._input_scales())
        return self._simulator

    def use_stored(self, input_scales: dict[str, torch.Tensor] | None) -> None:
        """Simulate a loaded checkpoint: the module's parameters already are the dequantized weights and
        ``input_scales`` (projection -> fp32 [E]) are the stored ones. Prefer
        :func:`quantport.modules.expert_simulation.attach_experts_simulator`."""
        self._stored_input_scales = input_scales
        self._simulator = ExpertsSimulator.from_parameters(self.block, self.codec, self._input_scales())

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
