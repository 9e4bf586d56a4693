"""Read a checkpoint directory lazily: JSON files, safetensors headers, and single tensors on demand.

Only the headers of the safetensors files are parsed up front (8-byte length + JSON), which gives
every tensor's dtype, shape and byte range without touching the data. Headers are validated by
:mod:`quantport.read` as strictly as the safetensors library does. Values are read with
``safetensors.safe_open`` one tensor at a time, and only for the tensors a rule asks for (scales
and other small tensors), so checking a large checkpoint costs little more than listing it.
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
)

__all__ = ["DTYPE_BYTES", "Checkpoint", "HeaderError", "TensorInfo", "read_header"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
HF_QUANT_CONFIG_FILE = "hf_quant_config.json"
INDEX_FILE = "model.safetensors.index.json"
REPORT_FILE = "quantport_report.json"


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
                ckpt.headers[name] = read_header(ckpt.path / name)
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

    def _handle(self, file: str) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(self.path / file), framework="pt")
            except Exception as exc:  # SafetensorError, OSError: the file changed or torch lacks the dtype
                raise HeaderError(f"cannot be opened by safetensors: {exc}", path=self.path / file) from None
            self._handles[file] = handle
        return handle

    def load(self, name: str) -> torch.Tensor | None:
        """The values of tensor ``name`` (None when it is not readable)."""
        info = self.tensors.get(name)
        if info is None:
            return None
        try:
            return self._handle(info.file).get_tensor(name)
        except HeaderError:
            raise
        except Exception as exc:  # SafetensorError, TypeError (a dtype torch cannot hold)
            raise HeaderError(f"tensor {name!r} cannot be read: {exc}", path=self.path / info.file) from None

    def iter_rows(self, name: str, max_elements: int) -> Iterator[torch.Tensor]:
        """Tensor ``name`` in slices along its first dimension of at most about ``max_elements`` elements."""
        info = self.tensors.get(name)
        if info is None:
            return
        if info.ndim == 0 or info.numel <= max_elements:
            tensor = self.load(name)
            if tensor is not None:
                yield tensor
            return
        rows = max(1, max_elements // max(1, info.numel // info.shape[0]))
        try:
            view = self._handle(info.file).get_slice(name)
            for start in range(0, info.shape[0], rows):
                yield view[start : start + rows]
        except HeaderError:
            raise
        except Exception as exc:
            raise HeaderError(f"tensor {name!r} cannot be read: {exc}", path=self.path / info.file) from None

    def load_float(self, name: str) -> torch.Tensor | None:
        """Tensor ``name`` as float32 (for scale checks)."""
        tensor = self.load(name)
        return None if tensor is None else tensor.to(torch.float32)

    def close(self) -> None:
        self._handles.clear()
