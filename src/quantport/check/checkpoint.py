"""Read a checkpoint directory lazily: JSON files, safetensors headers, and single tensors on demand.

Only the headers of the safetensors files are parsed up front (8-byte length + JSON), which gives
every tensor's dtype, shape and byte range without touching the data. Headers are validated by
:mod:`quantport.read` as strictly as the safetensors library does. Values are read at those validated
byte ranges (``os.pread``, one tensor or one slice of rows at a time), and only for the tensors a rule
asks for (scales and other small tensors), so checking a large checkpoint costs little more than
listing it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantport.read import (
    DTYPE_BYTES,
    HeaderError,
    JSONFileError,
    TensorInfo,
    UnreadableFileError,
    read_header,
    read_json_object,
    read_safetensors_header,
)
from quantport.read.files import open_regular

from .witnessed import WitnessedValues

__all__ = ["DTYPE_BYTES", "Checkpoint", "HeaderError", "TensorInfo", "read_header"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
HF_QUANT_CONFIG_FILE = "hf_quant_config.json"
INDEX_FILE = "model.safetensors.index.json"
REPORT_FILE = "quantport_report.json"

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu, "I16": torch.int16, "U16": torch.uint16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
}  # fmt: skip
"""The torch dtype of each safetensors dtype string (little-endian bytes, as on every host quantport runs on)."""


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(content, error): (None, None) when nothing exists at ``path``."""
    if not os.path.lexists(path):
        return None, None
    try:
        return read_json_object(path), None
    except JSONFileError as exc:
        return None, f"{path.name}: {exc.message}"


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
        index_total_size: the index's ``metadata.total_size`` as written (None when absent).
        witnessed: what the exporter established about tensor values as it wrote them (nothing, unless the
            check runs inside an export); the value rules skip reading what it vouches for.
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
    index_total_size: Any = None
    witnessed: WitnessedValues = field(default_factory=WitnessedValues)
    data_starts: dict[str, int] = field(default_factory=dict, repr=False)
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Read the JSON files and every safetensors header of ``path``."""
        ckpt = cls(Path(path))
        for attr, name in (("config", CONFIG_FILE), ("hf_quant_config", HF_QUANT_CONFIG_FILE), ("report", REPORT_FILE)):
            data, error = _read_json(ckpt.path / name)
            setattr(ckpt, attr, data)
            if error:
                ckpt.json_errors[name] = error
        ckpt._read_index()
        ckpt.files = sorted(p.name for p in ckpt.path.glob("*.safetensors"))
        for name in ckpt.files:
            try:
                header = read_safetensors_header(ckpt.path / name)
                ckpt.headers[name] = header.tensors
                ckpt.data_starts[name] = 8 + header.header_bytes
            except UnreadableFileError as exc:
                ckpt.file_errors[name] = HeaderError(exc.message, path=exc.path, truncated=exc.truncated)
            except OSError as exc:  # an I/O error while reading the header
                ckpt.file_errors[name] = HeaderError(f"cannot be read: {exc.strerror or exc}", path=ckpt.path / name)
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
        metadata = data.get("metadata")
        self.index_total_size = metadata.get("total_size") if isinstance(metadata, dict) else None

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

    def fileno(self, file: str) -> int:
        """The descriptor of shard ``file``, opened once (regular files only) and kept until :meth:`close`."""
        handle = self._handles.get(file)
        if handle is None:
            handle, _ = open_regular(self.path / file, HeaderError)
            self._handles[file] = handle
        return handle.fileno()

    def _read(self, info: TensorInfo, first_row: int, rows: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[first_row, first_row + rows)`` of tensor ``info`` (all of a 0-D tensor), read at its validated
        byte range (into ``out``, uint8 of at least that size, when given)."""
        row_shape = info.shape[1:]
        # 0-D: the whole tensor; an empty first dimension: no rows and no bytes (nbytes is 0)
        row_bytes = info.nbytes // info.shape[0] if info.ndim and info.shape[0] else info.nbytes
        offset = self.data_starts[info.file] + info.offsets[0] + first_row * row_bytes
        size = rows * row_bytes if info.ndim else info.nbytes
        buffer = torch.empty(size, dtype=torch.uint8) if out is None else out[:size]
        try:
            read = os.preadv(self.fileno(info.file), [buffer.numpy()], offset) if size else 0
        except OSError as exc:
            raise HeaderError(
                f"tensor {info.name!r} cannot be read: {exc.strerror or exc}", path=self.path / info.file
            ) from None
        if read != size:
            message = f"tensor {info.name!r} cannot be read: the file ends inside it"
            raise HeaderError(message, path=self.path / info.file, truncated=True)
        flat = buffer.view(TORCH_DTYPES[info.dtype])
        return flat.reshape((rows, *row_shape) if info.ndim else ())

    def load(self, name: str) -> torch.Tensor | None:
        """The values of tensor ``name`` (None when it is not readable)."""
        info = self.tensors.get(name)
        if info is None:
            return None
        return self._read(info, 0, info.shape[0] if info.ndim else 1)

    def iter_rows(self, name: str, max_elements: int) -> Iterator[torch.Tensor]:
        """Tensor ``name`` in slices along its first dimension of at most about ``max_elements`` elements.

        The slices of a tensor larger than that share one buffer: each is valid until the next is produced.
        """
        info = self.tensors.get(name)
        if info is None:
            return
        if info.ndim == 0 or info.numel <= max_elements:
            yield self._read(info, 0, info.shape[0] if info.ndim else 1)
            return
        rows = max(1, max_elements // max(1, info.numel // info.shape[0]))
        buffer = torch.empty(rows * (info.nbytes // info.shape[0]), dtype=torch.uint8)  # reused by every slice
        for start in range(0, info.shape[0], rows):
            yield self._read(info, start, min(rows, info.shape[0] - start), buffer)

    def load_float(self, name: str) -> torch.Tensor | None:
        """Tensor ``name`` as float32 (for scale checks)."""
        tensor = self.load(name)
        return None if tensor is None else tensor.to(torch.float32)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
