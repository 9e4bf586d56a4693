"""AWQ scales of every expert's down_proj input, folded into the same expert's up rows.

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
from torch import Tensor

from ...algorithm_options import AwqOptions
from ...arch.experts import MoEBlock
from ...schemes import SchemeCodec
from .awq import AwqChoice, Reader, awq_scale
from .routing import Routing

__all__ = ["ExpertDownChoice", "awq_expert_down", "expert_intermediate"]

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
