"""The one walk over a quantized model that every dialect's tensor plan makes.

A dialect says how one quantized Linear, one attention module's KV scales and one experts module are
written; the walk visits the modules in model order, collects those entries, and adds every tensor left
unquantized (the parameters the entries do not replace), under checkpoint names.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ...arch.hub_names import HubNames
from ...modules.quant_experts import ExpertsQuantizer, experts_quantizer_of
from ...modules.quant_linear import QuantLinear
from ..shards import OneSlotCache, PlannedTensor
from ..unquantized import unquantized_plan

__all__ = ["model_plan"]


def model_plan(
    model: nn.Module,
    names: HubNames,
    cache: OneSlotCache,
    *,
    linear: Callable[[str, QuantLinear], list[PlannedTensor]],
    kv: Callable[[str, nn.Module], list[PlannedTensor]],
    experts: Callable[[ExpertsQuantizer], tuple[list[PlannedTensor], set[str]]],
) -> list[PlannedTensor]:
    """Every tensor of the checkpoint, computed lazily; the model is only read.

    ``linear(checkpoint name, module)`` and ``kv(checkpoint name, module)`` give a module's entries;
    ``experts(quantizer)`` gives an experts module's entries and the model parameters they replace.
    """
    replaced: set[str] = set()
    plan: list[PlannedTensor] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            plan.extend(linear(names.module(name), module))
            replaced.add(f"{name}.weight")
        plan.extend(kv(names.module(name), module))
        quantizer = experts_quantizer_of(module)
        if quantizer is not None:
            entries, parameters = experts(quantizer)
            plan.extend(entries)
            replaced |= parameters
    return plan + unquantized_plan(model, replaced, names, cache)
