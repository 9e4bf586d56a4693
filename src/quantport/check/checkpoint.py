"""Read a checkpoint directory lazily: JSON files, safetensors headers, and single tensors on demand.

Only the headers of the safetensors files are parsed up front (8-byte length + JSON), which gives
every tensor's dtype, shape and byte range without touching the data. Values are read with
``safetensors.safe_open`` one tensor at a time, and only for the tensors a rule asks for (scales
and other small tensors), so checking a large checkpoint costs little more than listing it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["DTYPE_BYTES", "Checkpoint", "HeaderError", "TensorInfo", "read_header"]

logger = logging.getLogger(__name__)

DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
"""Bytes per element of each safetensors dtype string."""

CONFIG_FILE = "config.json"
HF_QUANT_CONFIG_FILE = "hf_quant_config.json"
INDEX_FILE = "model.safetensors.index.json"
REPORT_FILE = "quantport_report.json"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A tensor as its safetensors header describes it.

    Attributes:
        name: full tensor name.
        dtype: safetensors dtype string (``F8_E4M3``, ``U8``, ``F32``, ``BF16`` ...).
        shape: the shape; ``()`` for a 0-D scalar.
        file: name of the shard holding it.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 0)

    @property
    def is_scalar(self) -> bool:
        """0-D or a single element ``[1]``: what engines accept as a per-tensor scale."""
        return self.shape in ((), (1,))


class HeaderError(ValueError):
    """A safetensors file whose header cannot be read; ``truncated`` when the file is too short."""

    def __init__(self, message: str, *, truncated: bool = False) -> None:
        super().__init__(message)
        self.truncated = truncated


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate the header of one safetensors file, without reading tensor data."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise HeaderError(f"file has {size} bytes, fewer than the 8-byte header length", truncated=True)
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise HeaderError(f"header declares {n} bytes but the file has only {size - 8} after the length",
                              truncated=True)
        try:
            header = json.loads(handle.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HeaderError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    data_size = size - 8 - n
    return {name: _entry(name, entry, path.name, data_size) for name, entry in header.items()
            if name != "__metadata__"}


def _entry(name: str, entry: Any, file: str, data_size: int) -> TensorInfo:
    """One validated header entry: known dtype, byte range matching the shape, inside the file."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise HeaderError(f"header entry of {name!r} is malformed: {entry!r}") from None
    info = TensorInfo(name, str(dtype), shape, file)
    if dtype not in DTYPE_BYTES:
        raise HeaderError(f"{name!r} has unknown dtype {dtype!r}")
    if end - begin != info.nbytes:
        raise HeaderError(f"{name!r} occupies {end - begin} bytes but {dtype}{list(shape)} needs {info.nbytes}")
    if end > data_size:
        raise HeaderError(f"{name!r} ends at byte {end} of the data section, which has only {data_size} bytes",
                          truncated=True)
    return info


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(content, error): (None, None) when the file does not exist."""
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path.name} cannot be read as JSON: {exc}"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    return data, None


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, read lazily.

    Attributes:
        path: the directory.
        config: ``config.json`` (None when absent or unreadable).
        hf_quant_config: ``hf_quant_config.json`` (None when absent or unreadable).
        report: ``quantport_report.json`` (None when absent or unreadable).
        index: ``weight_map`` of ``model.safetensors.index.json`` (None without an index).
        json_errors: file name -> why it could not be read.
        files: safetensors files in the directory, sorted.
        headers: file -> its tensors, for the files whose header is valid.
        file_errors: file -> the header error, for the others.
        tensors: the tensors an engine would load: name -> info (the indexed shard's copy where an
            index exists, else the first file's).
    """

    path: Path
    config: dict[str, Any] | None = None
    hf_quant_config: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    index: dict[str, str] | None = None
    json_errors: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    headers: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)
    file_errors: dict[str, HeaderError] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Read the JSON files and every safetensors header of ``path``."""
        ckpt = cls(Path(path))
        for attr, name in (("config", CONFIG_FILE), ("hf_quant_config", HF_QUANT_CONFIG_FILE),
                           ("report", REPORT_FILE)):
            data, error = _read_json(ckpt.path / name)
            setattr(ckpt, attr, data)
            if error:
                ckpt.json_errors[name] = error
        ckpt._read_index()
        ckpt.files = sorted(p.name for p in ckpt.path.glob("*.safetensors") if p.is_file())
        for name in ckpt.files:
            try:
                ckpt.headers[name] = read_header(ckpt.path / name)
            except (HeaderError, OSError) as exc:
                ckpt.file_errors[name] = exc if isinstance(exc, HeaderError) else HeaderError(str(exc))
        ckpt._resolve_tensors()
        logger.debug("read %d tensors from %d files of %s", len(ckpt.tensors), len(ckpt.files), ckpt.path)
        return ckpt

    def _read_index(self) -> None:
        data, error = _read_json(self.path / INDEX_FILE)
        if error:
            self.json_errors[INDEX_FILE] = error
        if data is None:
            return
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            self.json_errors[INDEX_FILE] = f"{INDEX_FILE} has no 'weight_map' object of name -> file"
            return
        self.index = dict(weight_map)

    def _resolve_tensors(self) -> None:
        if self.index is not None:
            for name, file in self.index.items():
                info = self.headers.get(file, {}).get(name)
                if info is not None:
                    self.tensors[name] = info
            return
        for file in self.files:
            for name, info in self.headers.get(file, {}).items():
                self.tensors.setdefault(name, info)

    def load(self, name: str) -> torch.Tensor | None:
        """The values of tensor ``name`` (None when it is not readable)."""
        info = self.tensors.get(name)
        if info is None:
            return None
        handle = self._handles.get(info.file)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.path / info.file), framework="pt")
            self._handles[info.file] = handle
        return handle.get_tensor(name)

    def load_float(self, name: str) -> torch.Tensor | None:
        """Tensor ``name`` as float32 (for scale checks)."""
        tensor = self.load(name)
        return None if tensor is None else tensor.to(torch.float32)

    def close(self) -> None:
        self._handles.clear()
