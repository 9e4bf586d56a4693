"""Tensors a checkpoint writes as the model holds them, and the modules it lists as unquantized.

Shared by every checkpoint writer: tied weights are saved once, keys take their checkpoint (hub) names,
and tensors transformers fused at load (unquantized experts) are split back as the hub stores them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ..arch.engines import engine_ties_embeddings
from ..arch.hub_names import HubNames
from ..modules.quant_experts import experts_quantizer_of
from ..modules.quant_linear import QuantLinear
from ..schemes import TensorSpec
from .shards import OneSlotCache, PlannedTensor

__all__ = ["excluded_modules", "passthrough_entries", "tied_aliases", "unquantized_plan"]


def _engine_ties(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = {getattr(c, "model_type", "") for c in (config, text) if c is not None}
    return all(engine_ties_embeddings(t) for t in types if t)


def tied_aliases(model: nn.Module) -> set[str]:
    """State-dict keys that share storage with another key (tied weights). Each storage is saved
    once, under the input-embedding name rather than the output head's, as ``save_pretrained`` does.

    Except the output head of a family whose engine class ignores ``tie_word_embeddings``
    (:data:`quantport.arch.engines.ENGINE_DOES_NOT_TIE`, e.g. vLLM's GPT-OSS): its weight is written too,
    or the engine would compute with an uninitialised ``lm_head``.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_weight = getattr(output, "weight", None)
    untied = output_weight if output_weight is not None and not _engine_ties(model) else None
    by_storage: dict[tuple[int, tuple[int, ...]], list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel():  # meta tensors (a layer-by-layer model) have no storage: tied ones are one object
            key = id(tensor) if tensor.is_meta else tensor.data_ptr()
            by_storage.setdefault((key, tuple(tensor.shape)), []).append((name, tensor))
    aliases: set[str] = set()
    for members in by_storage.values():
        if len(members) > 1:
            keep = next((n for n, t in members if t is not output_weight), members[0][0])
            aliases.update(n for n, t in members if n != keep and (untied is None or t is not untied))
    return aliases


def passthrough_entries(
    name: str, tensor: torch.Tensor, names: HubNames, cache: OneSlotCache, current: Callable[[], torch.Tensor]
) -> list[PlannedTensor]:
    """An unquantized tensor under its checkpoint name(s); split when transformers fused it at load.

    ``current()`` gives the tensor when it is written (a model opened layer by layer gives a layer its
    tensors only then; ``tensor`` is what the model held when the plan was made)."""
    meta = names.split(name, torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"))
    if len(meta) == 1:
        (target,) = meta
        spec = TensorSpec(tensor.dtype, tuple(tensor.shape))
        return [PlannedTensor(target, spec, lambda: current().detach(), borrowed=True)]

    def pieces() -> dict[str, torch.Tensor]:
        return cache.get(name, lambda: names.split(name, current().detach()))

    return [
        PlannedTensor(target, TensorSpec(t.dtype, tuple(t.shape)), lambda k=target: pieces()[k].contiguous())
        for target, t in meta.items()
    ]


def unquantized_plan(model: nn.Module, replaced: set[str], names: HubNames, cache: OneSlotCache) -> list[PlannedTensor]:
    """Every state-dict tensor that is neither replaced by quantized tensors nor a tied alias."""
    aliases = tied_aliases(model)
    plan: list[PlannedTensor] = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name not in replaced and name not in aliases:
            plan.extend(passthrough_entries(name, tensor, names, cache, partial(_tensor_named, model, name)))
    return plan


def _tensor_named(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    tensor = module._parameters.get(leaf)
    return module._buffers[leaf] if tensor is None else tensor


def excluded_modules(model: nn.Module) -> list[str]:
    """Checkpoint names of the modules that carry no scale tensors: those with a 2-D weight (Linear,
    Embedding, routers) that are not quantized, and experts modules that are not quantized."""
    names = HubNames(model)
    excluded = []
    for name, module in model.named_modules():
        if not name or isinstance(module, QuantLinear) or experts_quantizer_of(module) is not None:
            continue
        weight = getattr(module, "weight", None)
        is_matrix = isinstance(weight, nn.Parameter) and weight.dim() >= 2
        down = getattr(module, "down_proj", None)
        is_experts = isinstance(down, nn.Parameter) and down.dim() == 3
        if is_matrix or is_experts:
            excluded.append(names.module(name))
    return sorted(excluded)
