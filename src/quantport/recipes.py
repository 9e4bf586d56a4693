"""Recipes: what to quantize and how, as data.

A :class:`QuantRecipe` names a :class:`LinearScheme` (the numeric format of weights and activations of
every quantized ``nn.Linear``), an optional KV-cache format, and the module-name patterns to leave in
full precision. Presets live in :data:`PRESETS`; look one up with :func:`get_recipe`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from enum import Enum

from .errors import QuantportError

__all__ = [
    "DEFAULT_EXCLUDES",
    "PRESETS",
    "VARIANTS",
    "KVCacheFormat",
    "LinearScheme",
    "QuantRecipe",
    "UnknownRecipeError",
    "get_recipe",
]


class LinearScheme(str, Enum):
    """The numbers of a quantized Linear layer (weights and activations): the name of exactly one numeric
    format, i.e. one :class:`~quantport.formats.descriptors.NumericFormat` descriptor registered with its codec
    in :mod:`quantport.formats` (``codec_for(scheme).format``; no two schemes share a descriptor).

    Members that look alike differ in the numbers, never only in how a checkpoint names them: ``nvfp4`` and
    ``nvfp4-ct`` round the global scale differently (``amax / 2688`` vs its reciprocal), ``w4a16`` and
    ``w4a16-modelopt`` divide by 7.5 in the model dtype vs 7 in fp32, ``w8a16-modelopt`` is per channel where
    ``w8a16`` is per 128 inputs. The suffix names the :class:`~quantport.formats.descriptors.ScaleConvention`
    of the dialect that stores those numbers; tensor names, ``quant_algo`` strings and config blocks are the
    dialects' (:mod:`quantport.dialects`). Every member that is no other's variant (:data:`VARIANTS`) is a
    preset recipe of the same name.
    """

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
    NVFP4_CT = "nvfp4-ct"
    """NVFP4 W4A4 with compressed-tensors' numerics: fp32 global scale ``448*6/amax`` (the divisor, the
    reciprocal of ModelOpt's), FP8 block scale ``fp8(global * block_amax / 6)``."""
    W4A16_NVFP4_CT = "w4a16-nvfp4-ct"
    """NVFP4 weights as :attr:`NVFP4_CT`, activations unquantized."""
    MXFP4 = "mxfp4"
    """MXFP4 weights (E2M1 with an E8M0 scale per 32 inputs), activations unquantized."""
    INT8 = "int8"
    """W8A8 INT8: symmetric per-output-channel weights (scale ``amax/127.5`` in the weight dtype, as
    compressed-tensors computes it), dynamic symmetric per-token INT8 activations."""
    W4A16 = "w4a16"
    """Symmetric INT4 weights, one scale per 128 inputs (``amax/7.5`` in the weight dtype); activations
    unquantized (compressed-tensors ``pack-quantized``)."""
    W4A16_ASYM = "w4a16-asym"
    """Asymmetric INT4 weights (scale and INT4 zero point per 128 inputs); activations unquantized."""
    W8A16 = "w8a16"
    """Symmetric INT8 weights, one scale per 128 inputs (``amax/127.5``); activations unquantized."""
    W8A16_ASYM = "w8a16-asym"
    """Asymmetric INT8 weights (scale and zero point per 128 inputs); activations unquantized."""
    W4A16_MODELOPT = "w4a16-modelopt"
    """INT4 weights as ModelOpt's ``W4A16_AWQ`` stores them: fp32 scale ``amax/7`` per 128 inputs, codes
    packed two per byte along the output dim; round to nearest (no AWQ smoothing); for TensorRT-LLM."""
    W8A16_MODELOPT = "w8a16-modelopt"
    """INT8 weights as ModelOpt's ``W8A16``: fp32 scale ``amax/127`` per output channel; for TensorRT-LLM."""

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
        linears: quantize Linear layers (False: MoE experts only, e.g. gpt-oss's native MXFP4).
        variants: schemes with the same intent whose numerics another checkpoint format stores
            exactly (e.g. ``nvfp4`` -> :attr:`LinearScheme.NVFP4_CT` for compressed-tensors); see
            :func:`quantport.export.recipe_for_format`.
    """

    name: str
    scheme: LinearScheme
    kv_cache: KVCacheFormat = KVCacheFormat.NONE
    exclude: tuple[str, ...] = field(default=DEFAULT_EXCLUDES)
    linears: bool = True
    variants: tuple[LinearScheme, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.scheme, LinearScheme):
            raise ValueError(f"scheme must be a LinearScheme, got {self.scheme!r}")
        if not isinstance(self.kv_cache, KVCacheFormat):
            raise ValueError(f"kv_cache must be a KVCacheFormat, got {self.kv_cache!r}")
        if not all(isinstance(v, LinearScheme) for v in self.variants):
            raise ValueError(f"variants must be LinearSchemes, got {self.variants!r}")

    def with_options(
        self, *, kv_cache: KVCacheFormat | str | None = None, extra_exclude: tuple[str, ...] = ()
    ) -> QuantRecipe:
        """A copy with a KV-cache format and/or user exclusion patterns added on top of the defaults."""
        kv = self.kv_cache if kv_cache is None else KVCacheFormat(kv_cache)
        return replace(self, kv_cache=kv, exclude=self.exclude + tuple(extra_exclude))

    def is_excluded(self, module_name: str) -> bool:
        """Whether ``module_name`` matches one of the exclusion patterns."""
        return any(fnmatch.fnmatchcase(module_name, pattern) for pattern in self.exclude)


VARIANTS: dict[LinearScheme, tuple[LinearScheme, ...]] = {
    LinearScheme.NVFP4: (LinearScheme.NVFP4_CT,),
    LinearScheme.W4A16_NVFP4: (LinearScheme.W4A16_NVFP4_CT,),
    LinearScheme.W4A16: (LinearScheme.W4A16_MODELOPT,),
    LinearScheme.W8A16: (LinearScheme.W8A16_MODELOPT,),
}
"""Schemes with the intent of the key whose numerics another checkpoint dialect stores exactly; they are
the preset's :attr:`QuantRecipe.variants` and get no preset of their own."""


def _presets() -> dict[str, QuantRecipe]:
    """One preset per scheme named by its value (variants excepted), and ``mxfp4-experts``: MXFP4 experts only
    (gpt-oss's native format), after ``mxfp4``."""
    variant_schemes = {variant for variants in VARIANTS.values() for variant in variants}
    presets: dict[str, QuantRecipe] = {}
    for scheme in LinearScheme:
        if scheme not in variant_schemes:
            presets[scheme.value] = QuantRecipe(scheme.value, scheme, variants=VARIANTS.get(scheme, ()))
        if scheme is LinearScheme.MXFP4:
            presets["mxfp4-experts"] = QuantRecipe("mxfp4-experts", scheme, linears=False)
    return presets


PRESETS: dict[str, QuantRecipe] = _presets()
"""Every preset recipe by name: adding a :class:`LinearScheme` member adds its preset."""


class UnknownRecipeError(QuantportError, ValueError):
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
