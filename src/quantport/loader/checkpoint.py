"""Reading a checkpoint directory: its config, its quantization settings and its tensors (lazily)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import ModelLoadError

__all__ = ["CheckpointError", "QuantSettings", "TensorStore", "read_quant_settings"]


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


def read_quant_settings(directory: Path, config: dict[str, Any]) -> QuantSettings:
    """The checkpoint's :class:`QuantSettings`, from ``config.json`` or ``hf_quant_config.json``."""
    block = config.get("quantization_config")
    nested_path = directory / "hf_quant_config.json"
    if block is None and nested_path.is_file():
        nested = json.loads(nested_path.read_text(encoding="utf-8"))
        block = {**nested.get("quantization", {}), "quant_method": "modelopt"}
    if not block:
        return QuantSettings()
    method = str(block.get("quant_method", "")).lower() or None
    if method != "modelopt":
        raise CheckpointError(
            f"{directory} is quantized with quant_method {method!r}; quantport.load reads ModelOpt "
            "checkpoints (quant_method 'modelopt') and unquantized ones"
        )
    layers = block.get("quantized_layers") or {}
    return QuantSettings(
        method=method,
        algo=_upper(block.get("quant_algo")),
        kv_algo=_kv_algo(block),
        layer_algos={name: str(spec.get("quant_algo", "")).upper() for name, spec in layers.items()},
    )


_FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class TensorStore:
    """The tensors of a checkpoint's safetensors files, read on demand; remembers which were used."""

    def __init__(self, directory: Path, device: torch.device) -> None:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory} has no *.safetensors files; quantport.load reads safetensors only")
        self._device = device
        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self._where: dict[str, int] = {}
        for index, handle in enumerate(self._handles):
            for key in handle.keys():  # noqa: SIM118  (safe_open is not a dict)
                self._where[key] = index
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
        return self._handles[self._where[name]].get_tensor(name).to(self._device)

    def most_common_dtype(self) -> torch.dtype | None:
        """Of bf16/fp16/fp32, the dtype holding most elements of non-scale tensors (None if none does)."""
        counts: Counter[str] = Counter()
        for key, index in self._where.items():
            if "scale" not in key.rsplit(".", 1)[-1]:
                view = self._handles[index].get_slice(key)
                counts[view.get_dtype()] += math.prod(view.get_shape())
        ranked = [dtype for dtype, _ in counts.most_common() if dtype in _FLOAT_DTYPES]
        return _FLOAT_DTYPES[ranked[0]] if ranked else None

    def unused(self) -> list[str]:
        """Tensors that were never read, sorted."""
        return sorted(set(self._where) - self._used)
