"""The exported tensors of quantized experts, a chunk of experts at a time (names are the callers').

Export-side helpers around :mod:`quantport.modules.expert_weights`: the weight tensors of a range of
experts plus each expert's ``input_scale`` (from the quantizer's calibrated and policy-filled input
amax), moved to the device the writer reads from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..formats.pieces import Piece
from ..modules import expert_weights
from ..modules.expert_simulation import PROJECTIONS
from ..modules.quant_experts import ExpertsQuantizer
from .shards import OneSlotCache, TensorRun

__all__ = ["ExpertTensor", "expert_chunks", "expert_runs", "gathered_bytes", "quantized_experts"]

ExpertTensor = tuple[int, str, Piece]
"""One exported tensor of an experts module: (expert, projection ``gate``/``up``/``down``, piece)."""


def expert_chunks(quantizer: ExpertsQuantizer) -> list[range]:
    """Consecutive experts quantized together (see :func:`quantport.modules.expert_weights.expert_chunks`)."""
    return expert_weights.expert_chunks(quantizer.block, quantizer.codec)


def quantized_experts(
    quantizer: ExpertsQuantizer, experts: range, device: torch.device | str | None = None
) -> list[dict[str, dict[Piece, torch.Tensor]]]:
    """Quantized pieces (``gate``/``up``/``down`` -> piece -> tensor) of each expert of ``experts``
    (consecutive), with the input scale for static schemes, optionally moved to ``device`` (one
    device-to-host copy per tensor kind of the chunk, not one per expert)."""
    scales = {projection: quantizer.input_scale(projection) for projection in PROJECTIONS}
    return expert_weights.quantize_expert_range(
        quantizer.block, quantizer.codec, quantizer.weight_amax, experts, scales, device
    )


def expert_runs(
    quantizer: ExpertsQuantizer, cache: OneSlotCache, tensors: dict[str, ExpertTensor]
) -> dict[int, TensorRun]:
    """expert -> the :class:`~.shards.TensorRun` of its chunk: the chunk is quantized as stacks (kept in
    ``cache`` while it is written) and the named tensors (``tensors``: name -> what it is) are gathered on
    their device into one buffer, in the order the writer asks for them."""
    scales = {projection: quantizer.input_scale(projection) for projection in PROJECTIONS}

    def run(chunk: range) -> TensorRun:
        def compute(names: Sequence[str]) -> torch.Tensor:
            stacks = cache.get(
                ("stacks", quantizer, chunk.start),
                lambda: expert_weights.quantize_expert_stacks(
                    quantizer.block, quantizer.codec, quantizer.weight_amax, chunk, scales
                ),
            )
            return gathered_bytes(stacks, [tensors[name] for name in names], chunk.start)

        return TensorRun(compute)

    return {expert: r for chunk in expert_chunks(quantizer) for r in [run(chunk)] for expert in chunk}


def gathered_bytes(
    stacks: dict[str, Mapping[Piece, torch.Tensor]], wanted: list[ExpertTensor], first: int
) -> torch.Tensor:
    """The bytes of the ``wanted`` tensors back to back, as one flat uint8 tensor on the stacks' device.

    ``stacks``: projection -> piece -> tensor with a leading expert dimension, expert ``first`` at index 0.
    When ``wanted`` lists whole experts one after the other with the same tensors in the same order (what a
    shard holds, but where a shard boundary cuts an expert), that is one concatenation of the stacks' rows:
    a handful of operator calls for the whole chunk, not a few per tensor.
    """
    per_expert = [key[1:] for key in wanted if key[0] == wanted[0][0]]
    count, rest = divmod(len(wanted), len(per_expert))
    e0 = wanted[0][0]
    regular = not rest and all(
        wanted[i] == (e0 + i // len(per_expert), *per_expert[i % len(per_expert)]) for i in range(len(wanted))
    )
    if regular:
        rows = [_rows(stacks[projection][piece][e0 - first : e0 - first + count]) for projection, piece in per_expert]
        return torch.cat(rows, dim=1).reshape(-1)
    return torch.cat([_rows(stacks[p][q][e - first : e - first + 1]).reshape(-1) for e, p, q in wanted])


def _rows(stack: torch.Tensor) -> torch.Tensor:
    """``stack`` [n, ...] as uint8 [n, bytes of one expert's tensor]."""
    return stack.contiguous().reshape(stack.shape[0], -1).view(torch.uint8)
