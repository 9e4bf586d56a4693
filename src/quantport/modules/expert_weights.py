"""Quantized weights of fused experts: the numbers both the simulation and the exporters use.

Pure functions of (experts module, layout, codec, weight amax): per-expert weight amax, each expert's
``[out, in]`` projections, the quantized tensors of a range of experts, and their dequantized form in
the model's own layout (what :class:`~quantport.modules.expert_simulation.ExpertsSimulator` computes
with after quantize). The exporters add the input scales and the names
(:mod:`quantport.export.expert_tensors`). Numerics follow the layout's
:class:`~quantport.arch.experts.ExpertScales`, never its on-disk naming.
"""

from __future__ import annotations

import torch

from ..arch.experts import ExpertScales, MoEBlock
from ..schemes import QuantizedPieces, SchemeCodec, quantizes_stacks

__all__ = [
    "STACK_BYTES",
    "STACK_BYTES_CUDA",
    "dequantized_experts",
    "expert_chunks",
    "expert_weight_amax",
    "oriented_expert_weights",
    "quantize_expert_range",
    "quantize_expert_stacks",
]

STACK_BYTES = 64 << 20
"""fp32 bytes of expert weights quantized in one call on the CPU."""
STACK_BYTES_CUDA = 256 << 20
"""... and on a GPU: a quarter of what one call could take, because the export quantizes up to four shards
at once (``export.shards.SHARD_WORKERS``) and its peak GPU memory is to stay that of one 1 GB chunk."""


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


def oriented_expert_weights(block: MoEBlock, expert: int | slice) -> dict[str, torch.Tensor]:
    """``[out, in]`` weights of expert ``expert`` (``[n, out, in]`` for a slice): gate, up, down.

    Layouts with one scale per projection are quantized from fp32 (one rounding of ``w / scale``), as
    ModelOpt quantizes its fused 3-D experts; per-expert scales quantize in the model dtype like a Linear.
    """
    experts, layout = block.experts, block.layout
    gate_up = experts.gate_up_proj[expert].detach()
    down = experts.down_proj[expert].detach()
    if layout.scales is ExpertScales.ONE_PER_PROJECTION:
        gate_up, down = gate_up.float(), down.float()
    return {"gate": layout.gate(gate_up), "up": layout.up(gate_up), "down": layout.down(down)}


def expert_chunks(block: MoEBlock, codec: SchemeCodec) -> list[range]:
    """Consecutive experts quantized together: all of a chunk's weights in fp32 fit :data:`STACK_BYTES`
    (:data:`STACK_BYTES_CUDA` on a GPU); one expert per chunk for codecs without stacks."""
    n = block.num_experts
    size = 1
    if quantizes_stacks(codec):
        experts = block.experts
        per_expert = 4 * (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel())
        budget = STACK_BYTES_CUDA if experts.down_proj.is_cuda else STACK_BYTES
        size = max(1, min(n, budget // per_expert))
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def quantize_expert_range(
    block: MoEBlock,
    codec: SchemeCodec,
    weight_amax: dict[str, torch.Tensor],
    experts: range,
    input_scales: dict[str, torch.Tensor | None] | None = None,
    device: torch.device | str | None = None,
) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Tensors (``gate``/``up``/``down`` -> suffix -> tensor) of each expert of ``experts`` (consecutive).

    ``input_scales`` (projection -> fp32 [E], or None) adds each expert's ``input_scale``; ``device``
    moves the tensors there. Codecs that take stacks quantize each projection of the range in one call
    (one kernel launch and one device-to-host copy per tensor kind, not one per expert).
    """
    if len(experts) > 1 and not quantizes_stacks(codec):
        return [
            quantize_expert_range(block, codec, weight_amax, range(e, e + 1), input_scales, device)[0] for e in experts
        ]
    index = slice(experts.start, experts.stop) if len(experts) > 1 else experts.start
    out: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in experts]
    for name, tensors in _quantized_projections(block, codec, weight_amax, index, input_scales).items():
        if device is not None:
            tensors = tensors.map(lambda v: v.to(device))
        for i in range(len(experts)):
            out[i][name] = {k: v[i] for k, v in tensors.items()} if len(experts) > 1 else dict(tensors)
    return out


def quantize_expert_stacks(
    block: MoEBlock,
    codec: SchemeCodec,
    weight_amax: dict[str, torch.Tensor],
    experts: range,
    input_scales: dict[str, torch.Tensor | None] | None = None,
) -> dict[str, QuantizedPieces]:
    """The tensors of :func:`quantize_expert_range` as stacks: projection -> pieces, each with a leading
    expert dimension (one tensor per piece for the whole range: what the exporters gather in one copy).
    Codecs without stacks quantize one expert at a time, stacked afterwards (the same values)."""
    if quantizes_stacks(codec):
        index = slice(experts.start, experts.stop)
        return _quantized_projections(block, codec, weight_amax, index, input_scales)
    per_expert = [quantize_expert_range(block, codec, weight_amax, range(e, e + 1), input_scales)[0] for e in experts]
    return {
        name: QuantizedPieces.of({piece: torch.stack([t[name][piece] for t in per_expert]) for piece in pieces})
        for name, pieces in per_expert[0].items()
    }


def _quantized_projections(
    block: MoEBlock,
    codec: SchemeCodec,
    weight_amax: dict[str, torch.Tensor],
    index: int | slice,
    input_scales: dict[str, torch.Tensor | None] | None,
) -> dict[str, QuantizedPieces]:
    out = {}
    for name, weight in oriented_expert_weights(block, index).items():
        projection = "down" if name == "down" else "gate_up"
        tensors = codec.quantize_weight(weight, weight_amax[projection][index])
        scale = None if input_scales is None else input_scales[projection]
        out[name] = tensors if scale is None else tensors.with_input_scale(scale[index])
    return out


def dequantized_experts(
    block: MoEBlock, codec: SchemeCodec, weight_amax: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``gate_up`` and ``down`` as dequantize(quantize(.)) in the model's own layout and dtype."""
    dtype = block.experts.down_proj.dtype
    gates, ups, downs = [], [], []
    for chunk in expert_chunks(block, codec):
        for tensors in quantize_expert_range(block, codec, weight_amax, chunk):
            gates.append(codec.dequantize_weight(tensors["gate"], dtype))
            ups.append(codec.dequantize_weight(tensors["up"], dtype))
            downs.append(codec.dequantize_weight(tensors["down"], dtype))
    layout = block.layout
    return {
        "gate_up": layout.fuse(torch.stack(gates), torch.stack(ups)).contiguous(),
        "down": layout.unorient_down(torch.stack(downs)).contiguous(),
    }
