"""The safetensors shards of a checkpoint directory: which file holds each stored tensor, and reading a few.

Headers go through quantport's validated reader (:func:`quantport.read.read_safetensors_header`), so a
hostile or truncated shard is refused before any tensor is read. Tensor bytes are read with
``safetensors.safe_open``, one handle per shard kept open until :meth:`Shards.close`: a read touches only
the requested tensors' bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..read import UnreadableFileError, read_json_object, read_safetensors_header
from ..read.safetensors_header import TensorInfo as StoredTensor
from .base import SourceError

__all__ = ["INDEX_FILE", "SAFETENSORS_DTYPES", "Shards", "StoredTensor", "torch_dtype_of"]

INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}  # fmt: skip
"""safetensors dtype strings -> torch dtypes (the sub-byte F4/F6 kinds have no torch dtype here)."""


def torch_dtype_of(stored: StoredTensor) -> torch.dtype:
    """The torch dtype of a stored tensor; :class:`SourceError` for a dtype torch cannot hold."""
    dtype = SAFETENSORS_DTYPES.get(stored.dtype)
    if dtype is None:
        raise SourceError(f"{stored.file}: tensor {stored.name!r} has dtype {stored.dtype}, which cannot be read")
    return dtype


def _weight_map(directory: Path) -> dict[str, str] | None:
    """The index's tensor name -> shard file map (None without an index)."""
    index = directory / INDEX_FILE
    if not index.exists():
        return None
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SourceError(f"{index}: 'weight_map' must map tensor names to shard file names")
    bad = sorted({f for f in weight_map.values() if Path(f).name != f or not f.endswith(".safetensors")})
    if bad:
        raise SourceError(f"{index}: shard names must be plain '*.safetensors' file names, got {bad[:3]}")
    return weight_map


class Shards:
    """Every stored tensor of a checkpoint directory, by name, readable a few at a time."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.stored: dict[str, StoredTensor] = {}
        weight_map = _weight_map(self.directory)
        if weight_map is not None:
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            raise SourceError(
                f"{directory}: no *.safetensors files and no {INDEX_FILE}; point at a checkpoint directory"
            )
        for file in files:
            try:
                header = read_safetensors_header(self.directory / file)
            except UnreadableFileError as exc:
                hint = "an interrupted download or copy" if exc.truncated else "a corrupt or foreign file"
                raise SourceError(f"{exc.located()} ({hint}; fetch the shard again)") from None
            for name, info in header.tensors.items():
                if name in self.stored:
                    raise SourceError(
                        f"{self.directory}: tensor {name!r} is stored twice ({self.stored[name].file} and {file})"
                    )
                self.stored[name] = info
        misplaced = [n for n, f in (weight_map or {}).items() if n not in self.stored or self.stored[n].file != f]
        if misplaced:
            raise SourceError(
                f"{self.directory / INDEX_FILE} lists {len(misplaced)} tensor(s) that are not in the shard it names, "
                f"e.g. {misplaced[:3]}: the download is incomplete or the index belongs to other shards"
            )
        self._handles: dict[str, Any] = {}

    def load(self, name: str, device: torch.device) -> torch.Tensor:
        """One stored tensor, as stored, on ``device`` (read on the host, then copied)."""
        stored = self.stored[name]
        torch_dtype_of(stored)
        handle = self._handles.get(stored.file)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.directory / stored.file), framework="pt", device="cpu")
            self._handles[stored.file] = handle
        tensor = handle.get_tensor(name)
        return tensor if device.type == "cpu" else tensor.to(device)

    def close(self) -> None:
        for handle in self._handles.values():
            exit_ = getattr(handle, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        self._handles.clear()
