"""The codec registry: every codec module of this package registers its codecs when imported.

:func:`discover_codecs` imports every module of :mod:`quantport.schemes` (a new codec file needs no
import line elsewhere); :mod:`quantport.schemes` runs it once when it is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, TypeVar

from ..recipes import LinearScheme

if TYPE_CHECKING:
    from .codec import SchemeCodec

__all__ = ["CODECS", "codec_for", "discover_codecs", "quantizes_stacks", "register"]

_INFRASTRUCTURE = frozenset({"codec", "registry"})

CODECS: dict[LinearScheme, SchemeCodec] = {}
"""Every registered codec by scheme."""

C = TypeVar("C")


def register(codec: C) -> C:
    """Register ``codec`` under its scheme (the last registration of a scheme wins)."""
    CODECS[codec.scheme] = codec  # type: ignore[attr-defined]
    return codec


def discover_codecs() -> None:
    """Import every codec module of :mod:`quantport.schemes` (each registers its codecs)."""
    package = __name__.rsplit(".", 1)[0]
    path = importlib.import_module(package).__path__
    for module in pkgutil.iter_modules(path):
        if module.name not in _INFRASTRUCTURE:
            importlib.import_module(f"{package}.{module.name}")


def codec_for(scheme: LinearScheme) -> SchemeCodec:
    """The codec of ``scheme``."""
    return CODECS[scheme]


def quantizes_stacks(codec: SchemeCodec) -> bool:
    """Whether ``codec.quantize_weight`` also takes a stack ``[E, out, in]`` (``codec.format.stacks``)."""
    return codec.format.stacks
