"""Reading MoE experts back into the model's fused 3-D ``gate_up_proj`` / ``down_proj`` parameters.

Experts may be stored fused (ModelOpt's names for Llama 4 and GPT-OSS, gpt-oss's native MXFP4
``gate_up_proj_blocks``, or an unquantized in-memory ``experts.gate_up_proj``) or one 2-D tensor per
expert and projection (``experts.{e}.gate_proj``, or Mixtral's ``w1``/``w3``/``w2``), each projection
decoded by the checkpoint dialect's :class:`~quantport.loader.linear.LinearDecoder` (ModelOpt or
compressed-tensors). Every fact about a family (orientation, gate/up halves or interleaved,
leaf names) comes from its :class:`~quantport.arch.experts.ExpertLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch.experts import MoEBlock
from ..arch.hub_names import HubNames
from ..dialects.modelopt import fused_name
from ..formats.pieces import Piece
from ..read.dialect import CheckpointDialect
from ..schemes import SchemeCodec
from .checkpoint import CheckpointError, TensorStore
from .linear import LinearDecoder
from .modelopt import DenseWeight, codec_for_algo, dequantize_fused
from .mxfp4_native import dequantize_native_mxfp4, has_native_mxfp4

__all__ = ["ExpertsRecord", "load_experts"]


@dataclass(frozen=True)
class ExpertsRecord:
    """How one experts module was stored, and its activation scales (for activation simulation).

    Attributes:
        name: in-memory name of the experts module.
        stored_as: checkpoint prefix of the experts, e.g. ``model.layers.0.block_sparse_moe.experts``.
        fused: stored as 3-D tensors (else one tensor per expert and projection).
        codec: the scheme the experts were quantized with, None when stored unquantized.
        gate_up_input_scale: fp32 ``[E]`` input scale of gate/up per expert (max of the two), or None.
        down_input_scale: fp32 ``[E]`` input scale of down per expert, or None.
    """

    name: str
    stored_as: str
    fused: bool
    codec: SchemeCodec | None
    gate_up_input_scale: torch.Tensor | None
    down_input_scale: torch.Tensor | None


@dataclass
class _Context:
    store: TensorStore
    dialect: CheckpointDialect
    decoder: LinearDecoder
    dtype: torch.dtype


def _stacked_scale(scales: list[torch.Tensor | None]) -> torch.Tensor | None:
    if any(s is None for s in scales):
        return None
    return torch.stack([s.reshape(()) for s in scales])  # type: ignore[union-attr]


def _expert_projection(ctx: _Context, prefix: str, shape: tuple[int, int]) -> tuple[DenseWeight, SchemeCodec | None]:
    """One expert's 2-D projection stored under ``prefix`` (quantized or not)."""
    module = ctx.dialect.modules.get(prefix)
    if module is None:
        weight = ctx.store.get(f"{prefix}.weight")
        if weight.dtype in (torch.uint8, torch.float8_e4m3fn):
            raise CheckpointError(f"{prefix}.weight is stored as {weight.dtype} but has no weight_scale")
        if tuple(weight.shape) != shape:
            raise CheckpointError(f"{prefix}.weight has shape {tuple(weight.shape)}, the model expects {shape}")
        return DenseWeight(weight.to(ctx.dtype), None), None
    decoded = ctx.decoder.decode(ctx.store, module, shape, ctx.dtype)
    return DenseWeight(decoded.weight, decoded.input_scale), decoded.codec


def _load_per_expert(ctx: _Context, block: MoEBlock, prefix: str) -> ExpertsRecord:
    layout, experts = block.layout, block.experts
    gate_leaf, up_leaf, down_leaf = layout.leaf_names
    gate_shape = tuple(layout.gate(experts.gate_up_proj).shape[-2:])
    down_shape = tuple(layout.down(experts.down_proj).shape[-2:])
    gates, ups, downs, gate_up_scales, down_scales, codecs = [], [], [], [], [], set()
    for e in range(block.num_experts):
        gate, gate_codec = _expert_projection(ctx, f"{prefix}.{e}.{gate_leaf}", gate_shape)
        up, up_codec = _expert_projection(ctx, f"{prefix}.{e}.{up_leaf}", gate_shape)
        down, down_codec = _expert_projection(ctx, f"{prefix}.{e}.{down_leaf}", down_shape)
        gates.append(gate.weight)
        ups.append(up.weight)
        downs.append(down.weight)
        pair = [s for s in (gate.input_scale, up.input_scale) if s is not None]
        gate_up_scales.append(torch.stack(pair).amax() if len(pair) == 2 else None)
        down_scales.append(down.input_scale)
        codecs.update({gate_codec, up_codec, down_codec})
    if len(codecs) > 1:
        raise CheckpointError(f"experts under {prefix} mix quantized and unquantized or different formats")
    with torch.no_grad():
        experts.gate_up_proj.copy_(layout.fuse(torch.stack(gates), torch.stack(ups)))
        experts.down_proj.copy_(layout.unorient_down(torch.stack(downs)))
    return ExpertsRecord(
        block.experts_name, prefix, False, codecs.pop(), _stacked_scale(gate_up_scales), _stacked_scale(down_scales)
    )


def _fused_param(ctx: _Context, block: MoEBlock, prefix: str, param: str) -> tuple[DenseWeight, SchemeCodec | None]:
    target: torch.Tensor = getattr(block.experts, param)
    shape = tuple(target.shape)
    if f"{prefix}.{fused_name(param, Piece.SCALE)}" not in ctx.store:
        weight = ctx.store.get(f"{prefix}.{param}")
        if tuple(weight.shape) != shape or weight.dtype in (torch.uint8, torch.float8_e4m3fn):
            raise CheckpointError(
                f"{prefix}.{param} is stored as {weight.dtype} {tuple(weight.shape)} without scales; "
                f"the model expects {shape}"
            )
        return DenseWeight(weight.to(ctx.dtype), None), None
    module = ctx.dialect.modules.get(prefix)
    algo = ctx.dialect.config.modelopt_algo_for(f"{prefix}.{param}") or (module.scheme if module else None)
    if algo is None:
        raise CheckpointError(f"{prefix}.{param} has scale tensors but the checkpoint config names no quant_algo")
    codec = codec_for_algo(algo)
    dense = dequantize_fused(ctx.store, prefix, param, codec, shape, ctx.dtype, block.layout.transposed)
    return dense, codec


def _native_param(ctx: _Context, block: MoEBlock, prefix: str, param: str) -> tuple[DenseWeight, SchemeCodec]:
    target: torch.Tensor = getattr(block.experts, param)
    transposed = block.layout.transposed
    experts, a, b = target.shape
    rows, codec = dequantize_native_mxfp4(
        ctx.store, prefix, param, (experts, b, a) if transposed else (experts, a, b), ctx.dtype
    )
    return DenseWeight(rows.transpose(-1, -2) if transposed else rows, None), codec


def _load_fused(ctx: _Context, block: MoEBlock, prefix: str) -> ExpertsRecord:
    read = _native_param if has_native_mxfp4(ctx.store, prefix) else _fused_param
    gate_up, codec = read(ctx, block, prefix, "gate_up_proj")
    down, down_codec = read(ctx, block, prefix, "down_proj")
    if codec is not down_codec:
        raise CheckpointError(f"experts under {prefix}: gate_up_proj and down_proj use different formats")
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(gate_up.weight)
        block.experts.down_proj.copy_(down.weight)
    return ExpertsRecord(block.experts_name, prefix, True, codec, gate_up.input_scale, down.input_scale)


def load_experts(
    block: MoEBlock,
    names: HubNames,
    store: TensorStore,
    dialect: CheckpointDialect,
    decoder: LinearDecoder,
    dtype: torch.dtype,
) -> ExpertsRecord:
    """Fill ``block``'s fused expert parameters from the checkpoint; return how they were stored.

    The experts are looked up under their saved (hub) name first, then their in-memory name.
    """
    ctx = _Context(store, dialect, decoder, dtype)
    gate_leaf = block.layout.leaf_names[0]
    prefixes = names.candidates(block.experts_name)
    for prefix in prefixes:
        if f"{prefix}.gate_up_proj" in store or has_native_mxfp4(store, prefix):
            return _load_fused(ctx, block, prefix)
        if store.first([f"{prefix}.0.{gate_leaf}.weight", f"{prefix}.0.{gate_leaf}.weight_packed"]):
            return _load_per_expert(ctx, block, prefix)
    looked = ", ".join(f"{p}.gate_up_proj, {p}.0.{gate_leaf}.weight" for p in prefixes)
    raise CheckpointError(f"the experts of {block.experts_name} are not in the checkpoint (looked for {looked})")
