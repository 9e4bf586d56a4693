"""Reading a checkpoint directory: its config, its quantization settings and its tensors (lazily)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
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

__all__ = ["CheckpointError", "QuantSettings", "TensorStore", "read_config", "read_quant_settings"]

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ModelLoadError):
    """The checkpoint cannot be read back: unknown format or algorithm, missing or malformed tensors."""


@dataclass(frozen=True)
class QuantSettings:
    """The quantization a checkpoint declares.

    Attributes:
        method: ``quant_method`` (``"modelopt"``), or None for an unquantized checkpoint.
        algo: the checkpoint-wide ``quant_algo`` (upper case), or None.
        kv_algo: ``kv_cache_quant_algo`` (``"FP8"``) or None.
        layer_algos: per-module ``quant_algo`` of a ``MIXED_PRECISION`` checkpoint.
    """

    method: str | None = None
    algo: str | None = None
    kv_algo: str | None = None
    layer_algos: dict[str, str] = field(default_factory=dict)

    def algo_for(self, module: str) -> str | None:
        """The ``quant_algo`` of the module stored under ``module``."""
        if module in self.layer_algos:
            return self.layer_algos[module]
        return None if self.algo == "MIXED_PRECISION" else self.algo


def _upper(value: Any) -> str | None:
    return value.upper() if isinstance(value, str) else None


def _kv_algo(block: dict[str, Any]) -> str | None:
    if "kv_cache_quant_algo" in block:
        return _upper(block["kv_cache_quant_algo"])
    scheme = block.get("kv_cache_scheme")
    if isinstance(scheme, dict):  # flat form: {"num_bits": 8, "type": "float", ...}
        return "FP8" if scheme.get("num_bits") == 8 and scheme.get("type") == "float" else "UNKNOWN"
    return _upper(scheme)


def _dict(value: Any, what: str, directory: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CheckpointError(f"{directory}/{what} is {str(value)[:60]!r}, not a JSON object")
    return value


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


def read_quant_settings(directory: Path, config: dict[str, Any]) -> QuantSettings:
    """The checkpoint's :class:`QuantSettings`, from ``config.json`` or ``hf_quant_config.json``."""
    block = config.get("quantization_config")
    nested_path = directory / "hf_quant_config.json"
    if block is None and os.path.lexists(nested_path):
        nested = _dict(_read_json(nested_path).get("quantization", {}), "hf_quant_config.json: quantization", directory)
        block = {**nested, "quant_method": "modelopt"}
    if block is None:
        return QuantSettings()
    source = "config.json" if config.get("quantization_config") is not None else "hf_quant_config.json"
    block = _dict(block, "config.json: quantization_config", directory)
    if not block:
        return QuantSettings()
    method = block.get("quant_method")
    method = method.lower() if isinstance(method, str) else None
    if method != "modelopt":
        raise CheckpointError(
            f"{directory / source}: quant_method {method!r}; quantport.load reads ModelOpt "
            "checkpoints (quant_method 'modelopt') and unquantized ones"
        )
    layers = _dict(block.get("quantized_layers") or {}, f"{source}: quantized_layers", directory)
    layer_algos = {}
    for name, spec in layers.items():
        algo = spec.get("quant_algo") if isinstance(spec, dict) else None
        if not isinstance(algo, str):
            raise CheckpointError(
                f"{directory / source}: quantized_layers[{name!r}] has no quant_algo string: {str(spec)[:60]}"
            )
        layer_algos[name] = algo.upper()
    return QuantSettings(
        method=method, algo=_upper(block.get("quant_algo")), kv_algo=_kv_algo(block), layer_algos=layer_algos
    )


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

    def unused(self) -> list[str]:
        """Tensors that were never read, sorted."""
        return sorted(set(self._where) - self._used)
