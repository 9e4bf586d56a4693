"""The native MXFP4 MoE checkpoint of gpt-oss (``quant_method: mxfp4``), which vLLM and SGLang load today.

Only the experts are quantized; every other tensor stays in the model dtype and is listed in
``modules_to_not_convert``. Per experts module ``P`` (rows in the model's gate/up order, i.e.
interleaved for GPT-OSS, already ``[out, in]``):

* ``P.gate_up_proj_blocks`` uint8 ``[E, 2I, H/32, 16]``: two E2M1 codes per byte, even element in the
  low nibble; ``P.gate_up_proj_scales`` uint8 E8M0 ``[E, 2I, H/32]`` (biased by 127);
* ``P.down_proj_blocks`` ``[E, H, I/32, 16]``, ``P.down_proj_scales`` ``[E, H, I/32]``;
* ``P.gate_up_proj_bias``, ``P.down_proj_bias`` as the model holds them.
"""

from __future__ import annotations

import torch
from torch import nn

from ...arch.hub_names import HubNames
from ...dialects import ExportFormat
from ...dialects.mxfp4_native import SCHEME, blocks_shape, stored_name
from ...formats.mx import MX_BLOCK
from ...formats.pieces import Piece
from ...modules.quant_experts import ExpertsQuantizer, experts_quantizer_of
from ...modules.quant_linear import QuantLinear
from ...recipes import LinearScheme
from ...schemes import TensorSpec
from ...state import QuantizationState
from ..content import CheckpointContent
from ..experts import all_expert_tensors, replaced_parameters
from ..shards import OneSlotCache, PlannedTensor
from ..unquantized import excluded_modules, unquantized_plan
from .base import Target, UnsupportedFormatError

__all__ = ["SCHEMES", "TARGET", "check_native_mxfp4", "native_mxfp4_content"]


def check_native_mxfp4(model: nn.Module, state: QuantizationState) -> list[ExpertsQuantizer]:
    """The experts quantizers to write; a clear error when the model does not fit the format."""
    if state.recipe.scheme is not SCHEME:
        raise UnsupportedFormatError(
            f"the native mxfp4 format stores MXFP4 experts only; quantize with --recipe mxfp4-experts "
            f"(got {state.recipe.scheme.value})"
        )
    quantized_linears = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if quantized_linears:
        raise UnsupportedFormatError(
            f"the native mxfp4 format keeps Linear layers in bf16, but {len(quantized_linears)} are quantized "
            f"(e.g. {quantized_linears[0]}); use --recipe mxfp4-experts, or --format compressed-tensors"
        )
    quantizers = [q for m in model.modules() if (q := experts_quantizer_of(m)) is not None]
    unsupported = sorted({q.layout.family for q in quantizers if not q.layout.native_mxfp4})
    if not quantizers or unsupported:
        raise UnsupportedFormatError(
            "the native mxfp4 format exists for GPT-OSS experts only"
            + (f" (this model has {', '.join(unsupported)} experts)" if unsupported else " (no quantized experts)")
            + "; use --format compressed-tensors"
        )
    return quantizers


def _blocks_and_scales(quantizer: ExpertsQuantizer) -> dict[str, torch.Tensor]:
    layout = quantizer.layout
    per_expert = all_expert_tensors(quantizer)
    out = {}
    for parameter, rows in (
        ("gate_up_proj", lambda key: [layout.fuse_rows(t["gate"][key], t["up"][key]) for t in per_expert]),
        ("down_proj", lambda key: [t["down"][key] for t in per_expert]),
    ):
        packed = torch.stack(rows(Piece.CODES))  # [E, out, in/2]
        scales = torch.stack(rows(Piece.SCALE))  # [E, out, in/32]
        out[stored_name(parameter, Piece.CODES)] = packed.reshape(blocks_shape(scales.shape)).contiguous()
        out[stored_name(parameter, Piece.SCALE)] = scales.contiguous()
    return out


def _expert_entries(quantizer: ExpertsQuantizer, names: HubNames, cache: OneSlotCache) -> list[PlannedTensor]:
    hidden, inter = quantizer.layout.down(quantizer.block.experts.down_proj[0]).shape
    experts = quantizer.block.num_experts
    shapes = {
        "gate_up_proj": (experts, 2 * inter, hidden // MX_BLOCK),
        "down_proj": (experts, hidden, inter // MX_BLOCK),
    }
    entries = []
    for parameter, scale_shape in shapes.items():
        for piece, shape in ((Piece.CODES, blocks_shape(scale_shape)), (Piece.SCALE, scale_shape)):
            key = stored_name(parameter, piece)
            entries.append(
                PlannedTensor(
                    names.tensor(f"{quantizer.block.experts_name}.{key}"),
                    TensorSpec(torch.uint8, shape),
                    lambda k=key: cache.get(quantizer, lambda: _blocks_and_scales(quantizer))[k],
                )
            )
    return entries


def native_mxfp4_content(model: nn.Module, state: QuantizationState) -> CheckpointContent:
    """The tensors and ``config.json``'s ``quantization_config``."""
    quantizers = check_native_mxfp4(model, state)
    names, cache = HubNames(model), OneSlotCache()
    plan: list[PlannedTensor] = []
    replaced: set[str] = set()
    for quantizer in quantizers:
        plan.extend(_expert_entries(quantizer, names, cache))
        replaced |= replaced_parameters(quantizer)
    plan.extend(unquantized_plan(model, replaced, names, cache))
    return CheckpointContent(plan, {"quant_method": "mxfp4", "modules_to_not_convert": excluded_modules(model)})


SCHEMES: frozenset[LinearScheme] = frozenset({SCHEME})
"""The schemes this dialect stores."""

TARGET = Target(ExportFormat.MXFP4, 2, SCHEMES, native_mxfp4_content)
"""This dialect, for :data:`quantport.export.targets.TARGETS`."""
