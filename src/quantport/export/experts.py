"""Planned tensors of quantized experts, named as the layout says engines read them.

ModelOpt's names (:mod:`quantport.dialects.modelopt`) for the codec's pieces:

* ``PER_EXPERT``: ``<block>.experts.{e}.<leaf>.{weight, weight_scale, weight_scale_2, input_scale}``
  with the layout's leaf names (``gate_proj``/``up_proj``/``down_proj`` or ``w1``/``w3``/``w2``).
* ``FUSED`` (ModelOpt's names for Llama 4 multimodal and GPT-OSS): ``<experts>.gate_up_proj`` in the
  model's own orientation (for NVFP4: packed and blocked along the input dimension, then transposed
  back, e.g. ``[E, H/2, 2I]``) and ``<experts>.gate_up_proj_{weight_scale, weight_scale_2,
  input_scale}`` scalars shared by all experts; the same for ``down_proj``.

Fused tensors are assembled from the per-expert quantized tensors, so both namings decode to exactly
the weights the simulation uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..arch.experts import ExpertNaming
from ..arch.hub_names import HubNames
from ..dialects.modelopt import fused_name, linear_suffix
from ..formats.pieces import Piece
from ..modules.quant_experts import ExpertsQuantizer
from ..schemes import TensorSpec
from .expert_tensors import expert_chunks, expert_runs, quantized_experts
from .shards import OneSlotCache, PlannedTensor

__all__ = ["all_expert_tensors", "expert_plan", "expert_tensors_lookup", "per_expert_plan", "replaced_parameters"]

_PROJECTIONS = ("gate", "up", "down")


def replaced_parameters(quantizer: ExpertsQuantizer) -> set[str]:
    """The experts module's parameters that the plan replaces."""
    name = quantizer.block.experts_name
    return {f"{name}.gate_up_proj", f"{name}.down_proj"}


def _specs(quantizer: ExpertsQuantizer, projection: str) -> dict[Piece, TensorSpec]:
    hidden, inter = quantizer.layout.down(quantizer.block.experts.down_proj[0]).shape  # [H, I]
    out_in = (hidden, inter) if projection == "down" else (inter, hidden)
    specs = quantizer.codec.weight_specs(*out_in)
    if quantizer.codec.static_input_scale:
        specs[Piece.INPUT_SCALE] = TensorSpec(torch.float32, ())
    return specs


def expert_tensors_lookup(
    quantizer: ExpertsQuantizer, cache: OneSlotCache
) -> Callable[[int], dict[str, dict[Piece, torch.Tensor]]]:
    """expert -> its exported tensors, quantized a chunk of experts at a time
    (:func:`~quantport.export.expert_tensors.expert_chunks`) and kept in ``cache`` while the chunk is written.
    They stay on the experts' device: the writer copies each one from a GPU straight into its page-locked
    buffer (a copy to pageable host memory first cost a second host copy per byte)."""
    chunk_of = {expert: chunk for chunk in expert_chunks(quantizer) for expert in chunk}

    def expert_tensors(expert: int) -> dict[str, dict[Piece, torch.Tensor]]:
        chunk = chunk_of[expert]
        tensors = cache.get((quantizer, chunk.start), lambda: quantized_experts(quantizer, chunk))
        return tensors[expert - chunk.start]

    return expert_tensors


def all_expert_tensors(quantizer: ExpertsQuantizer) -> list[dict[str, dict[Piece, torch.Tensor]]]:
    """Every expert's exported tensors, in expert order, quantized a chunk at a time."""
    chunks = expert_chunks(quantizer)
    return [t for chunk in chunks for t in quantized_experts(quantizer, chunk)]


def expert_projection_names(quantizer: ExpertsQuantizer, names: HubNames) -> list[tuple[int, str, str]]:
    """(expert, projection, checkpoint module name) of every expert projection, in expert order, with the
    layout's leaf names; all names resolved in one transformers call."""
    experts_name, leaves = quantizer.block.experts_name, quantizer.layout.leaf_names
    modules = [
        (e, projection, f"{experts_name}.{e}.{leaf}")
        for e in range(quantizer.block.num_experts)
        for projection, leaf in zip(_PROJECTIONS, leaves, strict=True)
    ]
    names.prefetch(module for _, _, module in modules)
    return [(e, projection, names.module(module)) for e, projection, module in modules]


def per_expert_plan(
    quantizer: ExpertsQuantizer,
    names: HubNames,
    cache: OneSlotCache,
    specs: dict[str, dict[Piece, TensorSpec]],
    suffix: Callable[[Piece], str],
) -> list[PlannedTensor]:
    """``<prefix>.<suffix(piece)>`` for every piece of ``specs[projection]`` of every expert projection, each
    computed alone or (where neighbours in a shard) with its chunk of experts in one :class:`TensorRun`."""
    expert_tensors = expert_tensors_lookup(quantizer, cache)
    planned = [
        (f"{prefix}.{suffix(piece)}", spec, (expert, projection, piece))
        for expert, projection, prefix in expert_projection_names(quantizer, names)
        for piece, spec in specs[projection].items()
    ]
    runs = expert_runs(quantizer, cache, {name: key for name, _, key in planned})
    return [
        PlannedTensor(
            name,
            spec,
            lambda e=e, p=p, q=q, shape=spec.shape: expert_tensors(e)[p][q].reshape(shape),
            run=runs[e],
        )
        for name, spec, (e, p, q) in planned
    ]


def _per_expert_plan(quantizer: ExpertsQuantizer, names: HubNames, cache: OneSlotCache) -> list[PlannedTensor]:
    specs = {projection: _specs(quantizer, projection) for projection in _PROJECTIONS}
    return per_expert_plan(quantizer, names, cache, specs, linear_suffix)


def _fused_tensors(quantizer: ExpertsQuantizer) -> dict[str, dict[Piece, torch.Tensor]]:
    layout = quantizer.layout
    per_expert = all_expert_tensors(quantizer)
    fused: dict[str, dict[Piece, torch.Tensor]] = {"gate_up_proj": {}, "down_proj": {}}
    for piece, first in per_expert[0]["gate"].items():
        if first.dim() == 0:  # per-tensor scales: one value shared by all experts
            fused["gate_up_proj"][piece] = first
            fused["down_proj"][piece] = per_expert[0]["down"][piece]
            continue
        gate = torch.stack([t["gate"][piece] for t in per_expert])
        up = torch.stack([t["up"][piece] for t in per_expert])
        down = torch.stack([t["down"][piece] for t in per_expert])
        fused["gate_up_proj"][piece] = layout.fuse(gate, up).contiguous()
        fused["down_proj"][piece] = layout.unorient_down(down).contiguous()
    return fused


def _fused_plan(quantizer: ExpertsQuantizer, names: HubNames, cache: OneSlotCache) -> list[PlannedTensor]:
    def tensors() -> dict[str, dict[Piece, torch.Tensor]]:
        return cache.get(quantizer, lambda: _fused_tensors(quantizer))

    experts = quantizer.block.num_experts
    plan = []
    for parameter, projection in (("gate_up_proj", "gate"), ("down_proj", "down")):
        for piece, spec in _specs(quantizer, projection).items():
            if spec.shape:
                out, inner = spec.shape
                if projection == "gate":
                    out *= 2
                shape = (experts, inner, out) if quantizer.layout.transposed else (experts, out, inner)
                spec = TensorSpec(spec.dtype, shape)
            name = names.tensor(f"{quantizer.block.experts_name}.{fused_name(parameter, piece)}")
            plan.append(PlannedTensor(name, spec, lambda p=parameter, q=piece: tensors()[p][q]))
    return plan


def expert_plan(quantizer: ExpertsQuantizer, names: HubNames, cache: OneSlotCache) -> list[PlannedTensor]:
    """Every exported tensor of one quantized experts module (biases are passed through elsewhere)."""
    if quantizer.layout.naming is ExpertNaming.FUSED:
        return _fused_plan(quantizer, names, cache)
    return _per_expert_plan(quantizer, names, cache)
