"""Shared-input groups of Linear layers, found from the module structure.

Serving engines fuse sibling projections that read the same input into one GEMM (vLLM's
``packed_modules_mapping``): q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``. A fused
GEMM has one activation scale and, for NVFP4, one global weight scale, so the members of a group
must agree on them (engine-contract.md §2). The groups are a fact about checkpoint names, which is
exactly how the engines find them, so they are found from the names of sibling modules here rather
than from a dummy forward pass. The table is :data:`quantport.arch.family.FUSED_SIBLINGS`, which the
checker reads too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .family import FUSED_SIBLINGS

__all__ = ["FUSED_SIBLINGS", "SharedInputGroup", "find_attention_modules", "find_shared_input_groups"]

KV_PROJECTIONS: tuple[str, str] = ("k_proj", "v_proj")
"""Children that mark a module as an attention block whose keys/values the engine caches."""


@dataclass(frozen=True, slots=True)
class SharedInputGroup:
    """Sibling Linear layers that an engine fuses into one GEMM.

    Attributes:
        fused_name: the engine's name of the fused layer, e.g. ``model.layers.0.self_attn.qkv_proj``.
        members: full module names of the members, in fusion order.
    """

    fused_name: str
    members: tuple[str, ...]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_shared_input_groups(model: nn.Module) -> list[SharedInputGroup]:
    """Every group of sibling ``nn.Linear`` children listed in :data:`~quantport.arch.family.FUSED_SIBLINGS`.

    A group is reported only when all its members exist and are Linear layers.
    """
    groups: list[SharedInputGroup] = []
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        for siblings in FUSED_SIBLINGS:
            if all(isinstance(children.get(s), nn.Linear) for s in siblings.members):
                members = tuple(_join(parent_name, s) for s in siblings.members)
                groups.append(SharedInputGroup(_join(parent_name, siblings.fused), members))
    return groups


def find_attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules with ``k_proj`` and ``v_proj`` Linear children: the attention blocks."""
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if all(isinstance(children.get(c), nn.Linear) for c in KV_PROJECTIONS):
            yield name, module
