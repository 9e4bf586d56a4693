"""Sharded safetensors written one tensor at a time (into the staging directory of :mod:`.output_dir`).

The writer takes a *plan*: every tensor's name, dtype and shape, known before any tensor is
computed, and a function that computes it. Shard headers are written first, then each tensor is
computed, written and dropped, so peak memory is one layer, not one checkpoint. Files follow the
safetensors format (8-byte little-endian header length, JSON header, raw little-endian data) and the
Hugging Face shard naming and index.

On machines with many cores several shards are written at once, each by its own thread (which computes
its tensors) with its own writer and I/O threads: one such pipeline moves about 0.8 GB/s on an H200 host
(bench/gpu_full_export.py), below what its disk takes. Each shard's bytes do not depend on how many are
written at once.

A shard of :data:`DIRECT_MIN_BYTES` or more is written with ``O_DIRECT`` (:func:`direct_policy`), so the fsync
before the rename has nothing left to flush; consecutive small tensors reach the writer in groups
(:mod:`.small_tensors`); and with a :class:`~.value_witness.ValueWitness`, each writer thread runs the
self-check's value tests on the bytes as it writes them (:mod:`.value_witness`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import ExportError
from ..memory.gc_pause import paused_gc
from ..schemes import TensorSpec
from ..sizes import parse_size
from .checkpoint_file import CheckpointFile, DirectPolicy
from .small_tensors import SmallTensorGroup
from .value_witness import ShardWitness, ValueWitness, WrittenTensor

__all__ = [
    "DirectPolicy",
    "OneSlotCache",
    "PlannedTensor",
    "ShardSelection",
    "TensorRun",
    "natural_order",
    "write_json",
    "write_sharded_safetensors",
]

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

IN_FLIGHT_BYTES = 64 << 20  # computed tensors waiting for the writer, at most (one larger tensor at a time)
RELEASE_BYTES = 32 << 20  # written between two releases of memory-mapped weights

DIRECT_WRITES: DirectPolicy | None = None
"""Internal option: how every shard is written (:class:`DirectPolicy`); None decides by the shard's size."""
DIRECT_MIN_BYTES = 32 << 20
"""Shards from this size up are written with ``O_DIRECT`` (where the file system takes it), so the fsync before
the rename finds nothing left to flush; smaller ones through the page cache, where a few padded direct
writes cost more than the flush they save."""

SHARD_WORKERS = max(1, min(4, (os.cpu_count() or 1) // 4))
"""Shards written at once: each pipeline takes about three busy threads (compute, copy, I/O), so one on a
2-core machine, four from 16 cores up."""

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class OneSlotCache:
    """Keeps the result of the last computation only, one slot per thread.

    Planned tensors of one module (a layer's weight and scales) come from one quantization; they are
    written one after the other, so one slot shared by the whole plan is enough, and memory never
    holds more than one module's tensors per shard being written.
    """

    _EMPTY = object()

    def __init__(self) -> None:
        self._slot = threading.local()

    def get(self, key: object, compute: Callable[[], object]) -> object:
        slot = self._slot
        if getattr(slot, "key", self._EMPTY) != key:
            slot.key, slot.value = self._EMPTY, None  # drop the old value before computing the new one
            slot.value = compute()
            slot.key = key
        return slot.value


@dataclass(frozen=True, eq=False)
class TensorRun:
    """Planned tensors computed together (e.g. a chunk of experts' weights and scales).

    ``compute(names)`` returns the bytes of the named tensors, in the order given, back to back: one flat
    uint8 tensor on their device. Where such tensors are next to each other in a shard, the writer asks for
    them in one call instead of one tensor at a time: on a GPU each tensor costs several operator calls and
    a hand-off between threads, tens of thousands of times per checkpoint (issue 17).
    """

    compute: Callable[[Sequence[str]], torch.Tensor]


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its name, its spec, and how to compute it (called once, when written).

    ``borrowed``: ``compute`` returns a tensor the model already holds (an unquantized parameter), so
    queueing it for the writer costs no memory unless its bytes had to be copied (e.g. off the GPU).
    ``run``: the :class:`TensorRun` that computes this tensor together with its neighbours (``compute`` is
    then used only where the tensor is alone in its shard).
    """

    name: str
    spec: TensorSpec
    compute: Callable[[], torch.Tensor]
    borrowed: bool = False
    run: TensorRun | None = None


@dataclass(frozen=True, slots=True)
class ShardSelection:
    """Which of the planned shard files this process writes, when several processes write one checkpoint
    (:mod:`quantport.distributed.shard_writers`): shard ``i`` (in file order) by writer ``i % writers``; the
    index by writer 0. A process whose ``writer`` is not below ``writers`` writes nothing. The default: all."""

    writer: int = 0
    writers: int = 1

    def writes(self, shard: int) -> bool:
        return shard % self.writers == self.writer

    @property
    def writes_index(self) -> bool:
        return self.writer == 0


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


_DIGITS = re.compile(r"(\d+)")


def natural_order(name: str) -> tuple[str | int, ...]:
    """Sort key reading digit runs as numbers: ``experts.2`` before ``experts.10``, so experts quantized
    in consecutive chunks are written chunk by chunk."""
    parts = _DIGITS.split(name)
    parts[1::2] = map(int, parts[1::2])
    return tuple(parts)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _Stopped(ExportError):
    """Another shard failed: this one stops at its next tensor (never raised to the caller: the other
    shard's error is)."""


def _write_shard(
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
            raise _Stopped
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


def direct_policy(shard_bytes: int) -> DirectPolicy:
    """How a shard of ``shard_bytes`` is written: :data:`DIRECT_WRITES` if set, else ``O_DIRECT`` from
    :data:`DIRECT_MIN_BYTES` up and the page cache below."""
    if DIRECT_WRITES is not None:
        return DirectPolicy(DIRECT_WRITES)
    return DirectPolicy.ALWAYS if shard_bytes >= DIRECT_MIN_BYTES else DirectPolicy.NEVER


def _split(plan: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for entry in plan:
        if shards[-1] and size + entry.spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.spec.nbytes
    return shards


def write_sharded_safetensors(
    plan: list[PlannedTensor],
    directory: Path,
    *,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
    release: Callable[[], None] | None = None,
    shard_workers: int | None = None,
    witness: ValueWitness | None = None,
    selection: ShardSelection | None = None,
    wrap: Callable[[list[PlannedTensor]], list[PlannedTensor]] | None = None,
) -> list[str]:
    """Write ``plan`` as HF-style safetensors shards, in :func:`natural_order` of the names (the tensors of
    one module, and consecutive experts, are next to each other); returns the file names.

    ``release`` runs after every ``RELEASE_BYTES`` of computed tensors and at the end (quantport drops
    the memory-mapped weights already quantized there). ``shard_workers``: shards written at once
    (default :data:`SHARD_WORKERS`); if one fails, the others stop at their next tensor and the first error
    is raised. ``witness``: tests the values quantport's checker reads back, as they are written
    (:mod:`.value_witness`), for the self-check that follows. ``selection``: write only these shard files (and
    the index only if it says so); the files and the index are those of the whole plan, so that processes
    writing the shards of one plan between them write the files one process would. ``wrap``: applied to the
    entries this process computes, in order (one entry for one: e.g. the layer reading of
    :class:`~quantport.sequential.streaming.LayerStream`, which must only count tensors that are computed).
    """
    with paused_gc():
        plan = sorted(plan, key=lambda e: natural_order(e.name))
        names = [e.name for e in plan]
        assert len(set(names)) == len(names), "duplicate tensor names in export plan"
        shards = _split(plan, parse_size(max_shard_size))
    files = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    selection = selection or ShardSelection()
    chosen = [
        (file, entries) for i, (file, entries) in enumerate(zip(files, shards, strict=True)) if selection.writes(i)
    ]
    mine = _wrapped([entries for _, entries in chosen], wrap)
    total = sum(e.spec.nbytes for entries in mine for e in entries)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress)
    release = _serialized(release or (lambda: None))
    stop = threading.Event()
    pinned = torch.cuda.is_available() and torch.cuda.is_initialized()  # tensors may come from a GPU

    def write(file: str, entries: list[PlannedTensor]) -> None:
        policy = direct_policy(sum(e.spec.nbytes for e in entries))
        shard_witness = witness.shard() if witness is not None else None
        try:
            with (
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantport-writer") as writer,
                CheckpointFile(directory / file, pinned=pinned, policy=policy) as handle,
            ):
                _write_shard(entries, handle, writer, release, bar, stop, shard_witness)
            if shard_witness is not None:
                shard_witness.close()
        except BaseException:
            stop.set()
            raise

    names_here = [file for file, _ in chosen]
    workers = max(1, min(len(mine), SHARD_WORKERS if shard_workers is None else shard_workers))
    if workers == 1:
        for file, entries in zip(names_here, mine, strict=True):
            write(file, entries)
    else:
        _write_in_parallel(write, names_here, mine, workers, stop)
    release()
    bar.close()
    if len(shards) > 1 and selection.writes_index:
        index = {
            "metadata": {"total_size": sum(e.spec.nbytes for e in plan)},
            "weight_map": {e.name: f for f, entries in zip(files, shards, strict=True) for e in entries},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def _wrapped(
    shards: list[list[PlannedTensor]], wrap: Callable[[list[PlannedTensor]], list[PlannedTensor]] | None
) -> list[list[PlannedTensor]]:
    """``shards`` with ``wrap`` applied to their entries together, split back into the same shards."""
    if wrap is None:
        return shards
    flat = wrap([entry for entries in shards for entry in entries])
    out, start = [], 0
    for entries in shards:
        out.append(flat[start : start + len(entries)])
        start += len(entries)
    assert start == len(flat), "wrap must return one entry per entry"
    return out


def _serialized(release: Callable[[], None]) -> Callable[[], None]:
    lock = threading.Lock()

    def locked() -> None:
        with lock:
            release()

    return locked


def _write_in_parallel(write, files: list[str], shards: list[list[PlannedTensor]], workers: int, stop) -> None:
    """``write(file, entries)`` for every shard on ``workers`` threads; the first real error is raised once
    every thread has stopped (a shard stopped because another failed is not that error). An interrupt of
    the calling thread stops every shard before it propagates, so no thread writes into a staging
    directory that is being removed."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quantport-shard")
    try:
        futures = [pool.submit(write, file, entries) for file, entries in zip(files, shards, strict=True)]
        wait(futures)
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None and not isinstance(e, _Stopped)), None)
    if first is not None:
        raise first


def write_json(path: Path, data: dict) -> None:
    """Deterministic JSON: sorted keys, two-space indent, trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
