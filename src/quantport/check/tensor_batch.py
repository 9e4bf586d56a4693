"""Many small tensors of a checkpoint read at once: one ``preadv`` per run of adjacent tensors.

A rule that reads every scale of a large MoE checkpoint one tensor at a time pays a system call and a
few tensor allocations per tensor (74,000 tensors in a Qwen3-30B-A3B export). :func:`read_batch` reads
a list of tensors into one buffer per dtype, the tensors of each dtype back to back, so a rule can test
a property of thousands of tensors with one torch operation per dtype (:attr:`TensorBatch.buffers`)
and still see each tensor (:meth:`TensorBatch.tensor`), exactly as :meth:`Checkpoint.load` returns it.
Tensors adjacent in a file (a weight's ``weight_scale``, ``weight_scale_2`` and the next module's
``input_scale``) are read by one ``preadv`` that scatters the file range into the dtype buffers.

Every byte range was validated with the header; a file that is shorter when it is read (cut after the
check started) raises the same :class:`~quantport.read.HeaderError` as a single read does, naming the
first tensor the file ends inside.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .checkpoint import DTYPE_BYTES, TORCH_DTYPES, Checkpoint, HeaderError, TensorInfo

__all__ = ["BATCH_BYTES", "BufferPool", "TensorBatch", "read_batch"]

BATCH_BYTES = 64 << 20
"""Bytes a rule reads in one batch (64 MB), so memory stays bounded whatever the checkpoint's size."""
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 1024
"""Buffers one ``preadv`` accepts."""


@dataclass
class TensorBatch:
    """Tensors read together.

    Attributes:
        buffers: safetensors dtype -> uint8 buffer holding the bytes of every tensor of that dtype,
            back to back (in the order the tensors were given).
        slots: tensor name -> (dtype, first byte, end byte) in its dtype's buffer.
        infos: tensor name -> its header entry.
    """

    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    slots: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    infos: dict[str, TensorInfo] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.slots

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` with its dtype and shape (a view of the batch's buffer)."""
        dtype, begin, end = self.slots[name]
        info = self.infos[name]
        return self.buffers[dtype][begin:end].view(TORCH_DTYPES[dtype]).reshape(info.shape)

    def itemsize(self, dtype: str) -> int:
        """Bytes per element of safetensors dtype ``dtype``."""
        return DTYPE_BYTES[dtype]

    def typed(self, dtype: str) -> torch.Tensor:
        """Every tensor of safetensors dtype ``dtype`` as one flat tensor of that dtype."""
        return self.buffers[dtype].view(TORCH_DTYPES[dtype])


def _runs(spans: list[tuple[int, int, str]]) -> list[list[tuple[int, int, str]]]:
    """(begin, end, name) spans of one file, sorted, grouped into runs of adjacent byte ranges."""
    runs: list[list[tuple[int, int, str]]] = []
    last = -1
    for span in sorted(spans):
        if span[0] == last and len(runs[-1]) < _IOV_MAX:
            runs[-1].append(span)
        else:
            runs.append([span])
        last = span[1]
    return runs


def _read_runs(ckpt: Checkpoint, file: str, spans: list[tuple[int, int, str]], batch: TensorBatch) -> None:
    arrays = {dtype: buffer.numpy() for dtype, buffer in batch.buffers.items()}
    fd, start = ckpt.fileno(file), ckpt.data_starts[file]
    slots = batch.slots
    for run in _runs(spans):
        size = run[-1][1] - run[0][0]
        if not size:
            continue
        views = []
        for _, _, name in run:
            dtype, begin, end = slots[name]
            views.append(arrays[dtype][begin:end])
        try:
            read = os.preadv(fd, views, start + run[0][0])
        except OSError as exc:
            message = f"tensor {run[0][2]!r} cannot be read: {exc.strerror or exc}"
            raise HeaderError(message, path=ckpt.path / file) from None
        if read != size:
            cut = next(name for _, end, name in run if end - run[0][0] > read)
            message = f"tensor {cut!r} cannot be read: the file ends inside it"
            raise HeaderError(message, path=ckpt.path / file, truncated=True)


class BufferPool:
    """One byte buffer that batches read one after another reuse.

    Fresh memory costs a page fault per 4 KB page on first touch (on some VMs ~3 s per GiB); a rule that
    reads gigabytes of scales in 64 MB batches touches the same 64 MB again instead.
    """

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, size: int) -> torch.Tensor:
        """``size`` bytes, valid until the next call (the previous bytes are overwritten)."""
        if self._buffer.numel() < size:
            self._buffer = torch.empty(size, dtype=torch.uint8)
        return self._buffer[:size]


def read_batch(ckpt: Checkpoint, infos: Iterable[TensorInfo], pool: BufferPool | None = None) -> TensorBatch:
    """Tensors ``infos`` (entries of ``ckpt.tensors`` whose dtype has a torch dtype) read in one batch.

    With ``pool``, the batch lives in the pool's buffer and is valid until the pool's next use.
    Raises :class:`~quantport.read.HeaderError` when a file cannot be read or ends inside a tensor.
    """
    batch = TensorBatch()
    sizes: dict[str, int] = {}
    by_file: dict[str, list[tuple[int, int, str]]] = {}
    for info in infos:
        if info.dtype not in TORCH_DTYPES:
            raise ValueError(f"{info.name}: dtype {info.dtype} has no torch dtype")
        begin, end = info.offsets
        first = sizes.get(info.dtype, 0)
        sizes[info.dtype] = first + end - begin
        batch.slots[info.name] = (info.dtype, first, first + end - begin)
        batch.infos[info.name] = info
        by_file.setdefault(info.file, []).append((begin, end, info.name))
    starts, total = {}, 0
    for dtype, size in sizes.items():  # 8-byte aligned, so each region views as its dtype
        starts[dtype], total = total, total + -(-size // 8) * 8
    memory = pool.take(total) if pool is not None else torch.empty(total, dtype=torch.uint8)
    batch.buffers = {dtype: memory[starts[dtype] : starts[dtype] + size] for dtype, size in sizes.items()}
    for file, spans in by_file.items():
        _read_runs(ckpt, file, spans, batch)
    return batch
