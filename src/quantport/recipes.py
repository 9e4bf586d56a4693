"""Recipes: what to quantize and how, as data.

A :class:`QuantRecipe` names a :class:`LinearScheme` (the numeric format of weights and activations of
every quantized ``nn.Linear``), an optional KV-cache format, and the module-name patterns to leave in
full precision. Presets live in :data:`PRESETS`; look one up with :func:`get_recipe`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from enum import Enum

__all__ = [
    "DEFAULT_EXCLUDES",
    "PRESETS",
    "KVCacheFormat",
    "LinearScheme",
    "QuantRecipe",
    "UnknownRecipeError",
    "get_recipe",
]


class LinearScheme(str, Enum):
    """Numeric format of a quantized Linear layer (weights and activations)."""

    FP8 = "fp8"
    """FP8 E4M3 weights, one fp32 scale per tensor; static per-tensor FP8 activations (W8A8)."""
    FP8_DYNAMIC = "fp8-dynamic"
    """FP8 E4M3 weights, one fp32 scale per output channel; dynamic per-token FP8 activations."""
    FP8_BLOCK = "fp8-block"
    """FP8 E4M3 weights, one fp32 scale per 128x128 block; activations unquantized (weight-only)."""
    NVFP4 = "nvfp4"
    """E2M1 weights, FP8 scale per 16 inputs, fp32 global scale; NVFP4 activations (W4A4)."""
    W4A16_NVFP4 = "w4a16-nvfp4"
    """NVFP4 weights as :attr:`NVFP4`, activations unquantized."""
    MXFP8 = "mxfp8"
    """FP8 E4M3 weights and activations with an E8M0 scale per 32 inputs."""

    def __str__(self) -> str:
        return self.value


class KVCacheFormat(str, Enum):
    """Format of the keys and values stored in the engine's KV cache."""

    NONE = "none"
    """Keys and values stay in the model dtype."""
    FP8 = "fp8"
    """FP8 E4M3 with one static fp32 scale per layer for keys and one for values (amax / 448)."""

    def __str__(self) -> str:
        return self.value


DEFAULT_EXCLUDES: tuple[str, ...] = (
    "*lm_head*",
    "*embed_tokens*",
    "*embeddings*",
    "*router*",
    "*mlp.gate",
    "*shared_expert_gate*",
    "*block_sparse_moe.gate",
    "*vision_tower*",
    "*vision_model*",
    "*visual*",
    "*embed_vision*",
    "*multi_modal_projector*",
    "output_layer*",
    "mtp.*",
)
"""Module-name patterns (shell wildcards over the full module name) never quantized by default:
output head, embeddings, MoE routers and gates, vision towers."""


@dataclass(frozen=True)
class QuantRecipe:
    """A complete quantization recipe.

    Attributes:
        name: preset name, or a user label.
        scheme: numeric format of every quantized Linear.
        kv_cache: KV-cache format.
        exclude: module-name patterns left unquantized (shell wildcards over full names).
    """

    name: str
    scheme: LinearScheme
    kv_cache: KVCacheFormat = KVCacheFormat.NONE
    exclude: tuple[str, ...] = field(default=DEFAULT_EXCLUDES)

    def __post_init__(self) -> None:
        if not isinstance(self.scheme, LinearScheme):
            raise ValueError(f"scheme must be a LinearScheme, got {self.scheme!r}")
        if not isinstance(self.kv_cache, KVCacheFormat):
            raise ValueError(f"kv_cache must be a KVCacheFormat, got {self.kv_cache!r}")

    def with_options(
        self, *, kv_cache: KVCacheFormat | str | None = None, extra_exclude: tuple[str, ...] = ()
    ) -> QuantRecipe:
        """A copy with a KV-cache format and/or user exclusion patterns added on top of the defaults."""
        kv = self.kv_cache if kv_cache is None else KVCacheFormat(kv_cache)
        return replace(self, kv_cache=kv, exclude=self.exclude + tuple(extra_exclude))

    def is_excluded(self, module_name: str) -> bool:
        """Whether ``module_name`` matches one of the exclusion patterns."""
        return any(fnmatch.fnmatchcase(module_name, pattern) for pattern in self.exclude)


PRESETS: dict[str, QuantRecipe] = {
    recipe.name: recipe
    for recipe in (
        QuantRecipe("fp8", LinearScheme.FP8),
        QuantRecipe("fp8-dynamic", LinearScheme.FP8_DYNAMIC),
        QuantRecipe("fp8-block", LinearScheme.FP8_BLOCK),
        QuantRecipe("nvfp4", LinearScheme.NVFP4),
        QuantRecipe("w4a16-nvfp4", LinearScheme.W4A16_NVFP4),
        QuantRecipe("mxfp8", LinearScheme.MXFP8),
    )
}


class UnknownRecipeError(ValueError):
    """Raised for a recipe name that is not a preset."""


def get_recipe(recipe: str | QuantRecipe) -> QuantRecipe:
    """Return the preset named ``recipe`` (a :class:`QuantRecipe` passes through)."""
    if isinstance(recipe, QuantRecipe):
        return recipe
    try:
        return PRESETS[recipe]
    except KeyError:
        known = ", ".join(PRESETS)
        raise UnknownRecipeError(f"unknown recipe {recipe!r}; choose one of: {known}") from None
