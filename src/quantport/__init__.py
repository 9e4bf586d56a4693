"""quantport: quantize Hugging Face causal LMs into checkpoints that serving engines load as they are.

The public names are imported on first use, so that ``quantport quantize`` can check its arguments
before torch and transformers are imported (seconds).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .calibration_sources import CalibrationData, CalibrationSource
    from .errors import QuantportError
    from .export import ExportFormat, export
    from .export.targets import recipe_for_format
    from .loader import load
    from .loader.checkpoint import CheckpointError
    from .pipeline import quantize, simulate
    from .recipes import PRESETS, KVCacheFormat, LinearScheme, QuantRecipe, get_recipe

_LAZY = {
    "CalibrationData": "calibration_sources",
    "CalibrationSource": "calibration_sources",
    "CheckpointError": "loader.checkpoint",
    "PRESETS": "recipes",
    "ExportFormat": "export",
    "KVCacheFormat": "recipes",
    "LinearScheme": "recipes",
    "QuantRecipe": "recipes",
    "QuantportError": "errors",
    "export": "export",
    "get_recipe": "recipes",
    "load": "loader",
    "quantize": "pipeline",
    "recipe_for_format": "export.targets",
    "simulate": "pipeline",
}

__all__ = [
    "CalibrationData",
    "CalibrationSource",
    "CheckpointError",
    "PRESETS",
    "ExportFormat",
    "KVCacheFormat",
    "LinearScheme",
    "QuantRecipe",
    "QuantportError",
    "__version__",
    "export",
    "get_recipe",
    "load",
    "quantize",
    "recipe_for_format",
    "simulate",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'quantport' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``quantport.export`` is the function, also once the ``quantport.export`` package is imported (the import
    system sets the package as an attribute of its parent; this property keeps the function)."""

    @property
    def export(self) -> Any:
        return importlib.import_module(".export", __name__).export

    @export.setter
    def export(self, _module: Any) -> None:
        pass


sys.modules[__name__].__class__ = _Package
