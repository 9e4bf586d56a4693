"""Checkpoint formats, which Linear schemes each one stores exactly, and a recipe's scheme per format.

A checkpoint format fixes how a weight is decoded, so a scheme's numerics either survive a format
bit for bit or they do not: ModelOpt stores NVFP4's global scale as ``amax / 2688`` and
compressed-tensors as its reciprocal, and the two round differently. Rather than exporting something
other than what was simulated, a recipe names one scheme per format (:attr:`QuantRecipe.variants`)
and the format is chosen before quantizing (``--format`` on the command line,
:func:`recipe_for_format` in the API). Asking for a (recipe, format) pair that does not exist is an
error that names the formats that do, raised before anything is loaded or written.
"""

from __future__ import annotations

from dataclasses import replace
from enum import Enum

from ..errors import ExportError
from ..recipes import LinearScheme, QuantRecipe, get_recipe
from ..schemes import codec_for
from .ct_schemes import CT_SCHEMES

__all__ = [
    "ExportFormat",
    "UnsupportedFormatError",
    "check_exportable",
    "default_format",
    "formats_for",
    "parse_format",
    "recipe_for_format",
    "supports",
]


class ExportFormat(str, Enum):
    """Checkpoint formats quantport writes."""

    MODELOPT = "modelopt"
    """NVIDIA ModelOpt unified HF checkpoint (``quant_method: modelopt``): vLLM, SGLang, TensorRT-LLM."""
    COMPRESSED_TENSORS = "compressed-tensors"
    """compressed-tensors checkpoint (``quant_method: compressed-tensors``): vLLM, SGLang, transformers."""
    MXFP4 = "mxfp4"
    """gpt-oss's native MXFP4 MoE checkpoint (``quant_method: mxfp4``, ``*_blocks`` / ``*_scales``):
    vLLM, SGLang, transformers. MXFP4 experts only; everything else in the model dtype."""

    def __str__(self) -> str:
        return self.value


class UnsupportedFormatError(ExportError):
    """A recipe or scheme has no form in the requested checkpoint format."""


def parse_format(fmt: ExportFormat | str) -> ExportFormat:
    """``fmt`` as an :class:`ExportFormat`; an error listing the choices otherwise."""
    try:
        return ExportFormat(fmt)
    except ValueError:
        known = ", ".join(f.value for f in ExportFormat)
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {known}") from None


def supports(fmt: ExportFormat, scheme: LinearScheme) -> bool:
    """Whether ``fmt`` stores ``scheme``'s numerics exactly and an engine reads them."""
    if fmt is ExportFormat.MODELOPT:
        return codec_for(scheme).modelopt_algo is not None
    if fmt is ExportFormat.MXFP4:
        return scheme is LinearScheme.MXFP4
    return scheme in CT_SCHEMES


def formats_for(scheme: LinearScheme) -> list[ExportFormat]:
    """The formats that store ``scheme``, in :class:`ExportFormat` order (ModelOpt first)."""
    return [fmt for fmt in ExportFormat if supports(fmt, scheme)]


def default_format(scheme: LinearScheme) -> ExportFormat:
    """The format used when none is asked for: the first that stores ``scheme``."""
    formats = formats_for(scheme)
    if not formats:
        raise UnsupportedFormatError(f"scheme {scheme.value} has no checkpoint format")
    return formats[0]


def _family(recipe: QuantRecipe) -> tuple[LinearScheme, ...]:
    return (recipe.scheme, *recipe.variants)


def recipe_for_format(recipe: str | QuantRecipe, fmt: ExportFormat | str | None) -> QuantRecipe:
    """The recipe with the scheme whose numerics ``fmt`` stores exactly (``fmt`` None: unchanged).

    The other schemes of the recipe stay as its variants. Raises :class:`UnsupportedFormatError`
    naming the formats that work when no scheme of the recipe fits ``fmt``.
    """
    base = get_recipe(recipe)
    if fmt is None:
        return base
    target = parse_format(fmt)
    family = _family(base)
    for scheme in family:
        if supports(target, scheme):
            return replace(base, scheme=scheme, variants=tuple(s for s in family if s is not scheme))
    working = sorted({f.value for s in family for f in formats_for(s)})
    raise UnsupportedFormatError(
        f"recipe {base.name!r} has no {target.value} form; it exports as {' or '.join(working)} "
        f"(use --format {working[0]}, or format={working[0]!r})"
    )


def check_exportable(recipe: QuantRecipe, fmt: ExportFormat) -> None:
    """Raise :class:`UnsupportedFormatError`, naming the fix, when ``fmt`` cannot store ``recipe.scheme``."""
    if supports(fmt, recipe.scheme):
        return
    other = next((s for s in recipe.variants if supports(fmt, s)), None)
    if other is not None:
        raise UnsupportedFormatError(
            f"the model was quantized with {recipe.scheme.value} numerics, which {fmt.value} does not store "
            f"exactly; quantize for {fmt.value} instead: quantport.quantize(model, "
            f"recipe_for_format({recipe.name!r}, {fmt.value!r}), ...) with "
            f"`from quantport.export import recipe_for_format`, or on the command line "
            f"`quantport quantize ... --recipe {recipe.name} --format {fmt.value}`"
        )
    working = " or ".join(f.value for f in formats_for(recipe.scheme))
    raise UnsupportedFormatError(
        f"recipe {recipe.name!r} ({recipe.scheme.value}) has no {fmt.value} form; export it as {working}"
    )
