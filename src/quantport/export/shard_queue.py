"""One shard's tensors computed in order and handed to its writer thread.

Each planned tensor (or each run of neighbours computed together, :class:`~.planned.TensorRun`) is computed
on the shard's thread and queued for the writer thread, at most :data:`IN_FLIGHT_BYTES` ahead, so computing
the next tensors overlaps writing the ones before; consecutive small tensors go in groups
(:mod:`.small_tensors`).
"""

from __future__ import annotations

import contextlib
import json
import struct
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import ExportError
from .checkpoint_file import CheckpointFile
from .planned import SAFETENSORS_DTYPES, PlannedTensor
from .small_tensors import SmallTensorGroup
from .value_witness import ShardWitness, WrittenTensor

__all__ = ["IN_FLIGHT_BYTES", "RELEASE_BYTES", "ShardStopped", "write_shard"]

IN_FLIGHT_BYTES = 64 << 20  # computed tensors waiting for the writer, at most (one larger tensor at a time)
RELEASE_BYTES = 32 << 20  # written between two releases of memory-mapped weights


def _header(entries: list[PlannedTensor]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        end = offset + entry.spec.nbytes
        header[entry.name] = {
            "dtype": SAFETENSORS_DTYPES[entry.spec.dtype],
            "shape": list(entry.spec.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(tensor: torch.Tensor, entry: PlannedTensor) -> torch.Tensor:
    """The tensor's raw little-endian bytes as a flat uint8 tensor on its own device (a view where possible;
    a GPU tensor is copied to the host by the writer, straight into its page-locked buffer)."""
    assert tensor.dtype == entry.spec.dtype and tuple(tensor.shape) == entry.spec.shape, (
        f"{entry.name}: computed {tensor.dtype} {tuple(tensor.shape)}, planned {entry.spec.dtype} {entry.spec.shape}"
    )
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class ShardStopped(ExportError):
    """Another shard failed: this one stops at its next tensor (never raised to the caller: the other
    shard's error is)."""


def write_shard(
    entries: list[PlannedTensor],
    handle: CheckpointFile,
    writer: ThreadPoolExecutor,
    release: Callable[[], None],
    bar,
    stop: threading.Event,
    witness: ShardWitness | None = None,
) -> None:
    """Header, then each tensor in order. The writer thread writes while this thread computes the next
    tensors (copies and file writes release the GIL); tensors queue for it up to ``IN_FLIGHT_BYTES``
    (beyond the one being written), so one module's quantization overlaps the writing of the one before."""
    in_flight: deque[tuple[Future, int]] = deque([(writer.submit(handle.write, _header(entries)), 0)])
    try:
        _queue_tensors(entries, _WriterQueue(handle, writer, in_flight, witness), release, bar, stop)
    except BaseException:
        # the file is closed next: no write may still be running into its buffers
        for future, _ in in_flight:
            future.cancel()
        for future, _ in in_flight:
            if not future.cancelled():
                with contextlib.suppress(Exception):
                    future.result()
        raise
    for future, _ in in_flight:
        future.result()


class _WriterQueue:
    """Hands data to a shard's writer thread, at most ``IN_FLIGHT_BYTES`` queued (``in_flight``: futures and
    their queued bytes); with a ``witness``, the writer tests the values the self-check would read back."""

    def __init__(
        self, handle: CheckpointFile, writer: ThreadPoolExecutor, in_flight: deque, witness: ShardWitness | None
    ) -> None:
        self.handle, self.writer, self.in_flight, self.witness = handle, writer, in_flight, witness
        self.queued = 0

    def submit(self, tensors: list[WrittenTensor], data: torch.Tensor, cost: int) -> None:
        in_flight = self.in_flight
        while in_flight and (in_flight[0][0].done() or self.queued + cost > IN_FLIGHT_BYTES):
            future, size = in_flight.popleft()
            future.result()
            self.queued -= size
        if self.witness is None:
            future = self.writer.submit(self.handle.write, data)
        else:
            future = self.writer.submit(self.witness.write, self.handle, tensors, data)
        in_flight.append((future, cost))
        self.queued += cost

    def submit_group(self, group: SmallTensorGroup) -> None:
        tensors, data = group.take()
        self.submit(tensors, data, data.numel())


def _queue_tensors(
    entries: list[PlannedTensor],
    queue: _WriterQueue,
    release: Callable[[], None],
    bar,
    stop: threading.Event,
) -> None:
    """Compute each tensor, or each run of neighbours (:class:`TensorRun`), and queue it for the writer;
    other small tensors go in groups (:mod:`.small_tensors`)."""
    since_release = 0
    group = SmallTensorGroup()
    start = 0
    while start < len(entries):
        if stop.is_set():
            raise ShardStopped
        entry = entries[start]
        end = _run_end(entries, start)
        if end - start > 1:
            if group:
                queue.submit_group(group)
            nbytes = _queue_run(entries[start:end], queue)
        else:
            tensor = entry.compute()
            data = _tensor_bytes(tensor, entry)
            written = WrittenTensor(entry.name, SAFETENSORS_DTYPES[entry.spec.dtype], tensor.numel())
            if group.accepts(data):
                group.add(written, data)
                if group.full:
                    queue.submit_group(group)
            else:
                if group:
                    queue.submit_group(group)
                queue.submit([written], data, 0 if entry.borrowed and _same_storage(data, tensor) else data.numel())
            nbytes = entry.spec.nbytes
        start = end
        since_release += nbytes
        if since_release >= RELEASE_BYTES:
            release()
            since_release = 0
        bar.update(nbytes)
    if group:
        queue.submit_group(group)


def _run_end(entries: list[PlannedTensor], start: int) -> int:
    """One past the last of the consecutive entries from ``start`` computed by the same run."""
    run, end = entries[start].run, start + 1
    if run is not None:
        while end < len(entries) and entries[end].run is run:
            end += 1
    return end


def _queue_run(entries: list[PlannedTensor], queue: _WriterQueue) -> int:
    """Compute a run of neighbours in one call and queue their bytes as one piece; returns its size."""
    data = entries[0].run.compute([e.name for e in entries])
    nbytes = sum(e.spec.nbytes for e in entries)
    assert data.dtype == torch.uint8 and data.dim() == 1 and data.numel() == nbytes, (
        f"{entries[0].name}..{entries[-1].name}: run computed {data.dtype} {tuple(data.shape)}, planned {nbytes} bytes"
    )
    written = [
        WrittenTensor(e.name, SAFETENSORS_DTYPES[e.spec.dtype], e.spec.nbytes // e.spec.dtype.itemsize) for e in entries
    ]
    queue.submit(written, data, nbytes)
    return nbytes
