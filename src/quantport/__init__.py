"""quantport: quantize Hugging Face causal LMs into checkpoints that serving engines load as they are."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import QuantportError  # noqa: E402
from .export import ExportFormat, export  # noqa: E402
from .export.targets import recipe_for_format  # noqa: E402
from .loader import load  # noqa: E402
from .pipeline import quantize, simulate  # noqa: E402
from .recipes import PRESETS, KVCacheFormat, LinearScheme, QuantRecipe, get_recipe  # noqa: E402

__all__ = [
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
