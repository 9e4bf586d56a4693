"""Model-family facts that are names, as data read by every stage (quantize, export and the checker).

The experts of a family are described by :class:`quantport.arch.experts.ExpertLayout` (layout, router,
leaf names, scales); this module holds the name facts shared by all families:

* :data:`FUSED_SIBLINGS`: sibling Linear children that serving engines fuse into one GEMM, so that the
  quantizer unifies their scales and the checker verifies them from the same table;
* :data:`VISION_MODULES` and :data:`MTP_PREFIXES`: parts of multimodal and multi-token-prediction
  checkpoints that engines load unquantized.

Pure data: no torch, so the checker may read it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FUSED_SIBLINGS", "MTP_PREFIXES", "VISION_MODULES", "SiblingGroup", "is_vision_module"]


@dataclass(frozen=True, slots=True)
class SiblingGroup:
    """Sibling Linear children that an engine fuses into one GEMM (vLLM's ``packed_modules_mapping``).

    A fused GEMM has one activation scale and, for NVFP4, one global weight scale, so the members must
    agree on them (engine-contract.md §2).

    Attributes:
        fused: the fused layer's child name in vLLM, e.g. ``qkv_proj``.
        members: the checkpoint's child names, in fusion order.
        aliases: the same fused layer's name in other engines (SGLang).
    """

    fused: str
    members: tuple[str, ...]
    aliases: tuple[str, ...] = ()


FUSED_SIBLINGS: tuple[SiblingGroup, ...] = (
    SiblingGroup("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    SiblingGroup("gate_up_proj", ("gate_proj", "up_proj")),
    SiblingGroup("w13", ("w1", "w3")),  # Mixtral-style gate/up names (per-expert Linears on disk)
    # DeepSeek MLA down-projections: vLLM's fused_qkv_a_proj, SGLang's fused_qkv_a_proj_with_mqa
    SiblingGroup("fused_qkv_a_proj", ("q_a_proj", "kv_a_proj_with_mqa"), aliases=("fused_qkv_a_proj_with_mqa",)),
)
"""Every sibling group engines fuse; the one table the quantizer and the checker read."""

VISION_MODULES: tuple[str, ...] = ("vision_tower", "vision_model", "vit_large_projector")
"""Name components of vision towers, which engines load unquantized."""

MTP_PREFIXES: tuple[str, ...] = ("mtp.",)
"""Prefixes of multi-token-prediction modules, which engines load unquantized."""


def is_vision_module(name: str) -> bool:
    """Whether a module name lies in a vision tower."""
    return any(v in name for v in VISION_MODULES)
