"""The codec registry: every module of :mod:`quantport.formats` that defines a scheme's codec registers it when
imported.

:func:`discover_codecs` imports every module of :mod:`quantport.formats` (a new format's file needs no import
line elsewhere); :mod:`quantport.schemes` runs it once when it is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, TypeVar

from ..recipes import LinearScheme

if TYPE_CHECKING:
    from .codec import SchemeCodec

__all__ = ["CODECS", "codec_for", "discover_codecs", "quantizes_stacks", "register"]

CODECS: dict[LinearScheme, SchemeCodec] = {}
"""Every registered codec by scheme."""

C = TypeVar("C")


def register(codec: C) -> C:
    """Register ``codec`` under its scheme (the last registration of a scheme wins)."""
    CODECS[codec.scheme] = codec  # type: ignore[attr-defined]
    return codec


def discover_codecs() -> None:
    """Import every module of :mod:`quantport.formats` (each format's file registers its codecs)."""
    formats = importlib.import_module(__name__.rsplit(".", 2)[0] + ".formats")
    for module in pkgutil.iter_modules(formats.__path__):
        importlib.import_module(f"{formats.__name__}.{module.name}")


def codec_for(scheme: LinearScheme) -> SchemeCodec:
    """The codec of ``scheme``."""
    return CODECS[scheme]


def quantizes_stacks(codec: SchemeCodec) -> bool:
    """Whether ``codec.quantize_weight`` also takes a stack ``[E, out, in]`` (``codec.format.stacks``)."""
    return codec.format.stacks
