"""Weight sources: a model's tensors by checkpoint name, a few at a time, on a device, dequantized.

:func:`open_source` reads a local checkpoint directory (plain, FP8-block or MXFP4 safetensors);
:class:`SyntheticSource` generates a model's tensors on the device (benchmarks of models too big for a disk).
"""

from __future__ import annotations

from .base import RowSource, SourceError, SourceFormat, TensorInfo, UnknownTensorError, WeightSource
from .checkpoint import SafetensorsSource, open_source
from .dequant import dequantize_fp8_block, dequantize_mxfp4
from .synthetic import SyntheticSource, is_fp8_linear_weight, model_tensor_infos

__all__ = [
    "RowSource",
    "SafetensorsSource",
    "SourceError",
    "SourceFormat",
    "SyntheticSource",
    "TensorInfo",
    "UnknownTensorError",
    "WeightSource",
    "dequantize_fp8_block",
    "dequantize_mxfp4",
    "is_fp8_linear_weight",
    "model_tensor_infos",
    "open_source",
]
