"""The exported tensors of quantized experts, a chunk of experts at a time (names are the callers').

Export-side helpers around :mod:`quantport.modules.expert_weights`: the weight tensors of a range of
experts plus each expert's ``input_scale`` (from the quantizer's calibrated and policy-filled input
amax), moved to the device the writer reads from.
"""

from __future__ import annotations

import torch

from ..formats.pieces import Piece
from ..modules import expert_weights
from ..modules.expert_simulation import PROJECTIONS
from ..modules.quant_experts import ExpertsQuantizer

__all__ = ["expert_chunks", "quantized_experts"]


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
