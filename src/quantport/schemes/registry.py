"""The codec registry: every module of :mod:`quantport.formats` that defines a scheme's codec registers it when
imported.

The first look-up imports every module of :mod:`quantport.formats` (:func:`discover_codecs`), so a new format's
file needs no import line elsewhere. Discovery waits for that first look-up: a format module imports the
codec protocol from this package, so discovering at import time would import a format module's siblings while
it is itself half-initialised.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, TypeVar

from ..recipes import LinearScheme

if TYPE_CHECKING:
    from .codec import SchemeCodec

__all__ = ["CODECS", "codec_for", "discover_codecs", "quantizes_stacks", "register"]

_REGISTERED: dict[LinearScheme, SchemeCodec] = {}
_discovered = False


class _Codecs(Mapping[LinearScheme, "SchemeCodec"]):
    """Every registered codec by scheme, in discovery order; reading it discovers them first."""

    def __getitem__(self, scheme: LinearScheme) -> SchemeCodec:
        discover_codecs()
        return _REGISTERED[scheme]

    def __iter__(self) -> Iterator[LinearScheme]:
        discover_codecs()
        return iter(_REGISTERED)

    def __len__(self) -> int:
        discover_codecs()
        return len(_REGISTERED)


CODECS: Mapping[LinearScheme, SchemeCodec] = _Codecs()
"""Every registered codec by scheme."""

C = TypeVar("C")


def register(codec: C) -> C:
    """Register ``codec`` under its scheme (the last registration of a scheme wins)."""
    _REGISTERED[codec.scheme] = codec  # type: ignore[attr-defined]
    return codec


def discover_codecs() -> None:
    """Import every module of :mod:`quantport.formats` once (each format's file registers its codecs)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    formats = importlib.import_module(__name__.rsplit(".", 2)[0] + ".formats")
    for module in pkgutil.iter_modules(formats.__path__):
        importlib.import_module(f"{formats.__name__}.{module.name}")


def codec_for(scheme: LinearScheme) -> SchemeCodec:
    """The codec of ``scheme``."""
    return CODECS[scheme]


def quantizes_stacks(codec: SchemeCodec) -> bool:
    """Whether ``codec.quantize_weight`` also takes a stack ``[E, out, in]`` (``codec.format.stacks``)."""
    return codec.format.stacks
