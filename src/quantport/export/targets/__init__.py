"""Checkpoint dialects ("targets"), which Linear schemes each stores exactly, and a recipe's scheme per dialect.

A numeric format (:mod:`quantport.formats`) knows no checkpoint vocabulary. A dialect maps a codec's
neutral pieces to tensor names, shapes, ``quant_algo`` strings and config blocks: its vocabulary is in
:mod:`quantport.dialects` (shared with the loader) and its writer is one module here:

* :mod:`.modelopt`: NVIDIA ModelOpt unified HF checkpoint;
* :mod:`.compressed_tensors` (with its experts :mod:`.ct_experts`; its rows are
  :mod:`quantport.dialects.compressed_tensors`);
* :mod:`.mxfp4_native`: gpt-oss's native MXFP4 MoE checkpoint.

:data:`TARGETS` lists them in priority order; the first that accepts a scheme is its default.

A checkpoint dialect fixes how a weight is decoded, so a scheme's numerics either survive a dialect
bit for bit or they do not: ModelOpt stores NVFP4's global scale as ``amax / 2688`` and
compressed-tensors as its reciprocal, and the two round differently
(:class:`~quantport.formats.descriptors.ScaleConvention`). Rather than exporting something other than
what was simulated, a recipe names one scheme per dialect (:attr:`QuantRecipe.variants`) and the dialect
is chosen before quantizing (``--format`` on the command line, :func:`recipe_for_format` in the API).
Asking for a (recipe, format) pair that does not exist is an error that names the formats that do,
raised before anything is loaded or written.

Each dialect's writer module defines ``TARGET`` (a :class:`Target` with its priority); this package
imports every module of its own and collects them (:func:`discover_targets`), so a new dialect needs no
line here. What adding a format or a dialect touches is listed in ``docs/extending.md``.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import replace

from ...dialects import ExportFormat
from ...errors import ExportError
from ...recipes import LinearScheme, QuantRecipe, get_recipe
from .base import Target, UnsupportedFormatError

__all__ = [
    "TARGETS",
    "ExportFormat",
    "Target",
    "UnsupportedFormatError",
    "check_exportable",
    "default_format",
    "discover_targets",
    "formats_for",
    "parse_format",
    "recipe_for_format",
    "supports",
    "target_for",
]


def discover_targets() -> tuple[Target, ...]:
    """Every ``TARGET`` defined by a module of this package, by priority (lowest first)."""
    found = []
    for module in pkgutil.iter_modules(__path__):
        target = getattr(importlib.import_module(f"{__name__}.{module.name}"), "TARGET", None)
        if isinstance(target, Target):
            found.append(target)
    return tuple(sorted(found, key=lambda target: target.priority))


TARGETS: tuple[Target, ...] = discover_targets()
"""Every dialect, in priority order: the first that stores a scheme is its default (ModelOpt first)."""


def target_for(fmt: ExportFormat) -> Target:
    """The dialect named ``fmt``."""
    return next(t for t in TARGETS if t.format is fmt)


def parse_format(fmt: ExportFormat | str) -> ExportFormat:
    """``fmt`` as an :class:`ExportFormat`; an error listing the choices otherwise."""
    try:
        return ExportFormat(fmt)
    except ValueError:
        known = ", ".join(f.value for f in ExportFormat)
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {known}") from None


def supports(fmt: ExportFormat, scheme: LinearScheme) -> bool:
    """Whether ``fmt`` stores ``scheme``'s numerics exactly and an engine reads them."""
    return target_for(fmt).accepts(scheme)


def formats_for(scheme: LinearScheme) -> list[ExportFormat]:
    """The formats that store ``scheme``, in :data:`TARGETS` order (ModelOpt first)."""
    return [target.format for target in TARGETS if target.accepts(scheme)]


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
