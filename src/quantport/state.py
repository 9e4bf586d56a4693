"""What quantization did to a model, kept on the model for export and reporting."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .arch.fused_groups import SharedInputGroup
from .errors import ExportError
from .modules.kv_cache import KVCacheQuantizer, kv_quantizer_of
from .modules.observe import SharedInputAmax
from .modules.quant_experts import ExpertsQuantizer, experts_quantizer_of
from .modules.quant_linear import QuantLinear, QuantMode
from .recipes import QuantRecipe
from .report.coverage import ExpertCoverage

__all__ = ["QuantizationState", "attach_state", "iter_quant_modules", "set_mode", "state_of"]

_ATTR = "quantport_state"


@dataclass
class QuantizationState:
    """The record of one :func:`quantport.quantize` call.

    Attributes:
        recipe: the recipe applied (with user options folded in).
        quantized: names of the quantized Linear layers.
        excluded: unquantized Linear layers -> why (pattern, shape, fused sibling, never ran).
        groups: shared-input groups whose scales were unified.
        kv_modules: attention modules with a KV-cache quantizer.
        experts: experts modules that are quantized.
        calibration_tokens: tokens seen in calibration (0 when none was needed).
        coverage: calibration tokens per expert and the policy that filled the gaps (MoE models).
        algorithm: the calibration algorithm (:class:`quantport.algorithm_options.Algorithm` value).
        left_at_rtn: quantized modules the algorithm left at round-to-nearest -> why (never silently).
        path: how the model ran: ``"whole-model"`` or ``"layer-by-layer"`` (:mod:`quantport.sequential`).
        memory: peak memory of a layer-by-layer run (device, host RSS), for the summary and the report.
        algorithm_notes: modules the algorithm treated otherwise than asked -> how (e.g. a MoE expert with
            few routed tokens that GPTQ dampened more).
        smoothing: what AWQ / SmoothQuant folded (places and strengths, places skipped and why, routing
            flips, output change), None for the other algorithms.
    """

    recipe: QuantRecipe
    quantized: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    groups: list[SharedInputGroup] = field(default_factory=list)
    kv_modules: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    calibration_tokens: int = 0
    coverage: ExpertCoverage | None = None
    algorithm: str = "max"
    left_at_rtn: dict[str, str] = field(default_factory=dict)
    path: str = "whole-model"
    memory: dict[str, int | str] | None = None
    algorithm_notes: dict[str, str] = field(default_factory=dict)
    smoothing: dict[str, Any] | None = None


def attach_state(model: nn.Module, state: QuantizationState) -> None:
    model.__dict__[_ATTR] = state


def state_of(model: nn.Module) -> QuantizationState:
    """The model's quantization state; a clear error when the model was never quantized."""
    state = model.__dict__.get(_ATTR)
    if state is None:
        raise ExportError("model is not quantized: call quantport.quantize(model, recipe) before export")
    return state


def iter_quant_modules(model: nn.Module) -> Iterator[QuantLinear | KVCacheQuantizer | ExpertsQuantizer]:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            yield module
        for attached in (kv_quantizer_of(module), experts_quantizer_of(module)):
            if attached is not None:
                yield attached


def set_mode(model: nn.Module, mode: QuantMode | str) -> None:
    """Put every quantized module of ``model`` in ``mode`` (off, calibrate, simulate).

    Calibration mode starts a run: the model's Linear layers share one fresh :class:`SharedInputAmax`
    (sibling projections read their common input once), which any other mode drops.
    """
    mode = QuantMode(mode)
    memo = SharedInputAmax() if mode is QuantMode.CALIBRATE else None
    for module in iter_quant_modules(model):
        module.mode = mode
        if isinstance(module, QuantLinear):
            module.input_memo = memo
