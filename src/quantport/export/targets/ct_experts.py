"""Quantized experts in a compressed-tensors checkpoint: 2-D tensors per expert, for every family.

compressed-tensors (as llm-compressor writes it, and as vLLM's ``CompressedTensorsMoEMethod`` reads
it) has no fused expert names: each expert's projections are Linear-like modules
``<block>.experts.{e}.<gate|up|down leaf>`` with the scheme's pieces under compressed-tensors' names
(``weight_packed``, ``weight_scale``, ``weight_global_scale``, ``input_global_scale``, ...). Leaf names come from the
layout (``gate_proj``/``up_proj``/``down_proj``, Mixtral's ``w1``/``w3``/``w2``), module names from
the checkpoint-name mapping. GPT-OSS (interleaved gate/up with biases) is refused: no vLLM loader
reads its experts from per-expert compressed-tensors names.
"""

from __future__ import annotations

import torch

from ...arch.engines import GPT_OSS_WORKING_FORM
from ...arch.experts import GateUpSplit
from ...arch.hub_names import HubNames
from ...dialects.compressed_tensors import CtScheme, ct_shape
from ...formats.pieces import Piece
from ...modules.expert_weights import oriented_expert_weights
from ...modules.quant_experts import ExpertsQuantizer
from ...schemes import TensorSpec
from ..experts import per_expert_plan, replaced_parameters
from ..shards import OneSlotCache, PlannedTensor
from .base import UnsupportedFormatError

__all__ = ["ct_expert_plan"]

_PROJECTIONS = ("gate", "up", "down")


def _check_layout(quantizer: ExpertsQuantizer) -> None:
    layout = quantizer.layout
    if layout.split is GateUpSplit.INTERLEAVED or layout.has_bias:
        working = GPT_OSS_WORKING_FORM if layout.native_mxfp4 else "--exclude '*.mlp.experts' (experts in bf16)"
        raise UnsupportedFormatError(
            f"{quantizer.block.experts_name}: {layout.family} experts (interleaved gate/up with biases) have "
            f"no compressed-tensors form that vLLM loads; use {working}"
        )


def _specs(quantizer: ExpertsQuantizer, projection: str) -> dict[Piece, TensorSpec]:
    down = oriented_expert_weights(quantizer.block, 0)["down"]  # [H, I], in the dtype the experts are quantized from
    hidden, inter = down.shape
    out_features, in_features = (hidden, inter) if projection == "down" else (inter, hidden)
    specs = quantizer.codec.weight_specs(out_features, in_features, down.dtype)
    if quantizer.codec.static_input_scale:
        specs[Piece.INPUT_SCALE] = TensorSpec(torch.float32, ())
    return {piece: TensorSpec(s.dtype, ct_shape(piece, s.shape, out_features)) for piece, s in specs.items()}


def ct_expert_plan(
    quantizer: ExpertsQuantizer, names: HubNames, row: CtScheme, cache: OneSlotCache
) -> tuple[list[PlannedTensor], set[str]]:
    """(every exported tensor of one quantized experts module, the model parameters it replaces)."""
    _check_layout(quantizer)

    specs = {projection: _specs(quantizer, projection) for projection in _PROJECTIONS}
    return per_expert_plan(quantizer, names, cache, specs, row.suffix), replaced_parameters(quantizer)
