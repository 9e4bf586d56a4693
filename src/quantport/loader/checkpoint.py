"""Reading a checkpoint directory: its config, its dialect (:mod:`quantport.read.dialect`) and its tensors (lazily)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import ModelLoadError
from ..read import (
    JSONFileError,
    TensorInfo,
    UnreadableFileError,
    model_field_problems,
    read_header,
    read_json_object,
)
from ..read.dialect import CheckpointDialect, detect_dialect
from ..read.quant_config import HF_QUANT_CONFIG_FILE, Dialect, config_quant_block

__all__ = ["CheckpointError", "TensorStore", "read_config", "read_dialect"]

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ModelLoadError):
    """The checkpoint cannot be read back: unknown format or algorithm, missing or malformed tensors."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except JSONFileError as exc:
        raise CheckpointError(exc.located()) from None


def read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of checkpoint ``directory``, its size fields validated."""
    if not directory.is_dir():
        raise ModelLoadError(f"checkpoint directory {directory} does not exist or is not a directory")
    path = directory / "config.json"
    if not os.path.lexists(path):
        raise ModelLoadError(f"{directory} has no config.json; it is not a Hugging Face checkpoint")
    config = _read_json(path)
    problems = model_field_problems(config)
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(p.describe() for p in problems[:4]))
    return config


def read_dialect(directory: Path, config: dict[str, Any], tensor_names: Iterable[str]) -> CheckpointDialect:
    """The checkpoint's dialect and quantized modules; a :class:`CheckpointError` for a dialect load cannot read."""
    nested_path = directory / HF_QUANT_CONFIG_FILE
    nested = _read_json(nested_path) if os.path.lexists(nested_path) else None
    if nested is not None and not isinstance(nested.get("quantization", {}), dict):
        raise CheckpointError(f"{nested_path}: 'quantization' is not a JSON object")
    if "quantization_config" in config and not isinstance(config["quantization_config"], dict | None):
        shown = str(config["quantization_config"])[:60]
        raise CheckpointError(f"{directory}/config.json: quantization_config is {shown!r}, not a JSON object")
    block = config_quant_block(config)
    if block is not None and not block:
        return detect_dialect({}, None, ())  # an empty quantization_config: unquantized
    found = detect_dialect(config, nested, tensor_names)
    source = directory / (found.config.source or "config.json")
    if found.dialect is Dialect.UNKNOWN:
        raise CheckpointError(
            f"{source}: quant_method {found.config.quant_method!r} is not supported; quantport.load reads "
            "ModelOpt (modelopt), compressed-tensors and native MXFP4 (mxfp4) checkpoints and unquantized ones"
        )
    if found.dialect is Dialect.MODELOPT:
        block = found.config.raw.get("quantization", {}) if found.config.nested else found.config.raw
        layers = block.get("quantized_layers") if isinstance(block, dict) else None
        if layers is not None and not isinstance(layers, dict):
            raise CheckpointError(f"{source}: quantized_layers is {str(layers)[:60]!r}, not a JSON object")
        for name, spec in found.config.quantized_layers.items():
            if not isinstance(spec, dict) or not isinstance(spec.get("quant_algo"), str):
                shown = str(spec)[:60]
                raise CheckpointError(f"{source}: quantized_layers[{name!r}] has no quant_algo string: {shown}")
    return found


_FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _index_files(directory: Path, present: set[str]) -> set[str] | None:
    """Shard names the index lists (None without an index); each must be a shard of this directory."""
    path = directory / INDEX_FILE
    if not os.path.lexists(path):
        return None
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: no 'weight_map' object of tensor name -> shard file")
    files = set(weight_map.values())
    for file in sorted(files):
        if file not in present:
            where = "outside the checkpoint directory" if Path(file).name != file else "which does not exist"
            raise CheckpointError(f"{path}: maps tensors to {file!r}, {where}")
    return files


class TensorStore:
    """The tensors of a checkpoint's safetensors files, read on demand; remembers which were used.

    Every header is validated (:mod:`quantport.read`) before safetensors opens the file, so a corrupt,
    truncated or non-regular file is a :class:`CheckpointError` naming it.
    """

    def __init__(self, directory: Path, device: torch.device) -> None:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory} has no *.safetensors files; quantport.load reads safetensors only")
        _index_files(directory, {f.name for f in files})
        self._device = device
        self._files = files
        self._infos: dict[str, TensorInfo] = {}
        self._where: dict[str, int] = {}
        for index, file in enumerate(files):
            try:
                header = read_header(file)
            except UnreadableFileError as exc:
                raise CheckpointError(exc.located()) from None
            for key, info in header.items():
                self._where[key] = index
                self._infos[key] = info
        self._handles: list[Any] = [None] * len(files)
        self._used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def first(self, names: tuple[str, ...] | list[str]) -> str | None:
        """The first of ``names`` that the checkpoint holds."""
        return next((n for n in names if n in self._where), None)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` on the target device (marked as used)."""
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        self._used.add(name)
        index = self._where[name]
        try:
            if self._handles[index] is None:
                self._handles[index] = safe_open(str(self._files[index]), framework="pt", device="cpu")
            tensor = self._handles[index].get_tensor(name)
        except Exception as exc:  # SafetensorError, OSError, TypeError (a dtype torch cannot hold)
            raise CheckpointError(f"{self._files[index]}: tensor {name!r} cannot be read: {exc}") from None
        return tensor.to(self._device)

    def stored_bytes(self) -> int:
        """Bytes of every tensor in the checkpoint."""
        return sum(info.nbytes for info in self._infos.values())

    def most_common_dtype(self) -> torch.dtype | None:
        """Of bf16/fp16/fp32, the dtype holding most elements of non-scale tensors (None if none does)."""
        counts: Counter[str] = Counter()
        for key, info in self._infos.items():
            if "scale" not in key.rsplit(".", 1)[-1]:
                counts[info.dtype] += info.numel
        ranked = [dtype for dtype, _ in counts.most_common() if dtype in _FLOAT_DTYPES]
        return _FLOAT_DTYPES[ranked[0]] if ranked else None

    def names(self) -> list[str]:
        """Every tensor name of the checkpoint."""
        return list(self._where)

    def unused(self) -> list[str]:
        """Tensors that were never read, sorted."""
        return sorted(set(self._where) - self._used)
