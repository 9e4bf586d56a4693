"""Reading checkpoint files safely: safetensors headers, JSON files and model-config fields.

This is the reader layer that ``quantport check``, ``quantport inspect`` and ``quantport.load`` share,
including dialect detection (:func:`detect_dialect`: ModelOpt, compressed-tensors, native MXFP4).
Every function here refuses a hostile file with a :class:`~quantport.errors.QuantportError` that names
the file and the problem, in bounded memory and time: declared lengths are checked before anything is
read, only regular files are opened, and JSON nesting and duplicate keys are refused.
"""

from __future__ import annotations

from .dialect import CheckpointDialect, ModuleRole, QuantizedModule, detect_dialect
from .files import UnreadableFileError, open_regular, require_regular_file
from .json_files import MAX_JSON_BYTES, JSONFileError, read_json_object
from .model_config import ModelFieldProblem, model_field_problems
from .quant_config import CTGroup, Dialect, QuantConfig, parse_quant_config
from .safetensors_header import (
    DTYPE_BITS,
    DTYPE_BYTES,
    MAX_HEADER_BYTES,
    HeaderError,
    SafetensorsHeader,
    TensorInfo,
    read_header,
    read_safetensors_header,
)

__all__ = [
    "DTYPE_BITS",
    "CTGroup",
    "CheckpointDialect",
    "Dialect",
    "ModuleRole",
    "QuantConfig",
    "QuantizedModule",
    "detect_dialect",
    "parse_quant_config",
    "DTYPE_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_JSON_BYTES",
    "HeaderError",
    "JSONFileError",
    "ModelFieldProblem",
    "SafetensorsHeader",
    "TensorInfo",
    "UnreadableFileError",
    "model_field_problems",
    "open_regular",
    "read_header",
    "read_json_object",
    "read_safetensors_header",
    "require_regular_file",
]
