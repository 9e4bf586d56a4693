"""AWQ scales of every expert's down_proj input, folded into the same expert's up rows; experts' clipping.

An expert computes ``down(act(gate x) * up x)``: the intermediate is linear in ``up``'s rows, so a scale
``s_e`` per intermediate channel of expert ``e`` divides up's rows and multiplies down's columns without
changing the function. The intermediates are recomputed from the sampled block inputs (no hook inside the
fused experts module): each expert sees the sampled tokens its router sends it, multiplied by their
routing weight where the family weighs the input (Llama 4). Where the weight multiplies the expert's output
instead, the scored rows are multiplied by it, so a token's error counts as much as it moves the block's
output; the scale statistic (mean |h|) is the unweighted intermediate's, as AWQ defines it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...algorithm_options import AwqOptions
from ...arch.experts import MoEBlock
from ...schemes import SchemeCodec
from .awq import AwqChoice, Reader, awq_clipped_weight, awq_scale
from .routing import Routing

__all__ = ["ExpertDownChoice", "awq_expert_down", "clip_experts", "expert_intermediate"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExpertDownChoice:
    """Scales ``[E, I]`` (fp32; rows of experts no sampled token reached are 1) and each expert's choice."""

    scales: Tensor
    choices: list[AwqChoice | None]


def expert_intermediate(gate: Tensor, up: Tensor, act: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """fp32 ``act(x gate^T) * (x up^T)`` ``[n, I]`` for one expert (``gate``, ``up``: ``[I, H]``)."""
    x = x.float()
    return act(x @ gate.float().T) * (x @ up.float().T)


def awq_expert_down(
    codec: SchemeCodec, block: MoEBlock, routing: Routing, x: Tensor, options: AwqOptions
) -> ExpertDownChoice:
    """The AWQ scale of each expert's down_proj input, from the sampled block inputs ``x`` ``[n, H]``."""
    experts, layout = block.experts, block.layout
    act = experts.act_fn
    gate_up = experts.gate_up_proj.detach()
    gates, ups = layout.gate(gate_up), layout.up(gate_up)
    downs = layout.down(experts.down_proj.detach())
    scales = torch.ones(gates.shape[0], gates.shape[1])
    choices: list[AwqChoice | None] = []
    for expert in range(gates.shape[0]):
        rows, weights = routing.tokens(expert)
        if rows.numel() == 0:
            choices.append(None)
            continue
        inputs = x[rows].float()
        if routing.weighs_input:
            inputs = (inputs * weights[:, None]).to(x.dtype).float()
        h = expert_intermediate(gates[expert], ups[expert], act, inputs)
        scored = h if routing.weighs_input else h * weights[:, None]
        choice = awq_scale(codec, scored, h.abs().mean(dim=0), [Reader(downs[expert])], options)
        scales[expert] = choice.scale.cpu()
        choices.append(choice)
    return ExpertDownChoice(scales, choices)


def _output_error(codec: SchemeCodec, weight: Tensor, reference: Tensor, x: Tensor) -> float:
    """``||x (Q(weight) - reference)^T||^2`` with the amax the quantizer will measure on ``weight`` itself."""
    decoded = codec.dequantize_weight(codec.quantize_weight(weight, weight.float().abs().amax()), weight.dtype)
    return float((x @ (decoded.float() - reference.float()).T).square().sum())


def _clipped(codec: SchemeCodec, weight: Tensor, x: Tensor, options: AwqOptions) -> Tensor:
    """The clipping search's weight, or ``weight`` itself where clipping moved the per-tensor amax (NVFP4's
    global scale: the search holds it fixed, the quantizer measures it after) so that the error grew."""
    clipped = awq_clipped_weight(codec, weight, weight.float().abs().amax(), x, options)
    better = _output_error(codec, clipped, weight, x) <= _output_error(codec, weight, weight, x)
    return clipped if better else weight


def clip_experts(codec: SchemeCodec, block: MoEBlock, routing: Routing, x: Tensor, options: AwqOptions) -> int:
    """AWQ's clipping search on every reached expert's weights, written into the experts module: gate and up
    (one ``[2I, H]`` weight, one amax) against the output error on the expert's routed inputs, down against
    it on the expert's intermediates (each token weighted as in :func:`awq_expert_down`). Returns how many
    experts were searched (unreached ones keep their weights)."""
    experts, layout = block.experts, block.layout
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    gates, ups, downs = layout.gate(gate_up).clone(), layout.up(gate_up).clone(), layout.down(down).clone()
    searched = 0
    for expert in range(gates.shape[0]):
        rows, weights = routing.tokens(expert)
        if rows.numel() == 0:
            continue
        inputs = x[rows].float()
        if routing.weighs_input:
            inputs = (inputs * weights[:, None]).to(x.dtype).float()
        h = expert_intermediate(gates[expert], ups[expert], experts.act_fn, inputs)
        if not routing.weighs_input:
            inputs, h = inputs * weights[:, None], h * weights[:, None]
        clipped = _clipped(codec, torch.cat([gates[expert], ups[expert]]), inputs, options)
        gates[expert], ups[expert] = clipped[: gates.shape[1]], clipped[gates.shape[1] :]
        downs[expert] = _clipped(codec, downs[expert], h, options)
        searched += 1
    experts.gate_up_proj = nn.Parameter(layout.fuse(gates, ups).to(gate_up.dtype), requires_grad=False)
    experts.down_proj = nn.Parameter(layout.unorient_down(downs).to(down.dtype), requires_grad=False)
    return searched
