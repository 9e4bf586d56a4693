"""The safetensors shards of a checkpoint directory: which file holds each stored tensor, and reading a few.

Headers go through quantport's validated reader (:func:`quantport.read.read_safetensors_header`), so a
hostile or truncated shard is refused before any tensor is read. A tensor is then read with ``pread`` at
its validated offsets into a buffer of exactly its size (pinned when it goes on to a GPU, copied there
asynchronously): only the requested bytes are read, and nothing is memory-mapped, so the process's resident
memory does not grow with the pages of the shards it has read (a mapping keeps them counted until it is
closed). One descriptor per shard stays open until :meth:`Shards.close`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from ..read import UnreadableFileError, open_regular, read_json_object, read_safetensors_header
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
        self._data_start: dict[str, int] = {}
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
            self._data_start[file] = 8 + header.header_bytes
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
        self._descriptors: dict[str, int] = {}
        self._lock = threading.Lock()

    def _descriptor(self, file: str) -> int:
        with self._lock:  # reads may come from a prefetching thread too (pread itself needs no lock)
            fd = self._descriptors.get(file)
            if fd is None:
                handle, _ = open_regular(self.directory / file)
                fd = self._descriptors[file] = os.dup(handle.fileno())
                handle.close()
            return fd

    def load(self, name: str, device: torch.device, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One stored tensor, as stored, on ``device`` (read on the host, then copied); ``rows = (start, stop)``
        reads only ``tensor[start:stop]`` (along the first dimension: a contiguous byte range)."""
        stored = self.stored[name]
        dtype = torch_dtype_of(stored)
        begin, end = stored.offsets
        shape = stored.shape
        if rows is not None:
            begin, end, shape = _row_range(stored, rows)
        gpu = device.type == "cuda"
        buffer = torch.empty(end - begin, dtype=torch.uint8, pin_memory=gpu)
        if end > begin:
            _read_exactly(self._descriptor(stored.file), buffer, self._data_start[stored.file] + begin, stored)
        tensor = buffer.view(dtype).reshape(shape)
        if device.type == "cpu":
            return tensor
        return tensor.to(device, non_blocking=gpu)

    def close(self) -> None:
        with self._lock:
            for fd in self._descriptors.values():
                os.close(fd)
            self._descriptors.clear()


def _row_range(stored: StoredTensor, rows: tuple[int, int]) -> tuple[int, int, tuple[int, ...]]:
    """Byte offsets and shape of ``stored[start:stop]`` (rows along the first dimension)."""
    start, stop = rows
    count = stored.shape[0] if stored.shape else 0
    if not 0 <= start <= stop <= count:
        raise SourceError(f"rows {start}:{stop} of tensor {stored.name!r} are outside its {count} rows")
    begin, end = stored.offsets
    row_bytes = (end - begin) // count if count else 0
    return begin + start * row_bytes, begin + stop * row_bytes, (stop - start, *stored.shape[1:])


def _read_exactly(fd: int, buffer: torch.Tensor, offset: int, stored: StoredTensor) -> None:
    view = memoryview(buffer.numpy()).cast("B")
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count <= 0:
            raise SourceError(
                f"{stored.file}: tensor {stored.name!r} ends past the end of the file (it changed or was truncated "
                "after it was opened); fetch the shard again"
            )
        done += count
