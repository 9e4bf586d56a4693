"""Sharded safetensors written one tensor at a time (into the staging directory of :mod:`.output_dir`).

The writer takes a *plan*: every tensor's name, dtype and shape, known before any tensor is
computed, and a function that computes it. Shard headers are written first, then each tensor is
computed, written and dropped, so peak memory is one layer, not one checkpoint. Files follow the
safetensors format (8-byte little-endian header length, JSON header, raw little-endian data) and the
Hugging Face shard naming and index.

On machines with many cores several shards are written at once, each by its own thread (which computes its
tensors, :mod:`.shard_queue`) with its own writer and I/O threads; each shard's bytes do not depend on how many
are written at once. Neighbouring tensors computed together (a chunk of experts, :class:`~.planned.TensorRun`)
reach the writer as one piece, so a 30B MoE export is written at about the disk's speed on an H200 host
(bench/results/gpu_full_export.md).

A shard of :data:`DIRECT_MIN_BYTES` or more is written with ``O_DIRECT`` (:func:`direct_policy`), so the fsync
before the rename has nothing left to flush; and with a :class:`~.value_witness.ValueWitness`, each writer
thread runs the self-check's value tests on the bytes as it writes them (:mod:`.value_witness`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..memory.gc_pause import paused_gc
from ..sizes import parse_size
from .checkpoint_file import CheckpointFile, DirectPolicy
from .planned import OneSlotCache, PlannedTensor, TensorRun, natural_order
from .shard_queue import ShardStopped, write_shard
from .value_witness import ValueWitness

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
                write_shard(entries, handle, writer, release, bar, stop, shard_witness)
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
    first = next((e for e in errors if e is not None and not isinstance(e, ShardStopped)), None)
    if first is not None:
        raise first


def write_json(path: Path, data: dict) -> None:
    """Deterministic JSON: sorted keys, two-space indent, trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
