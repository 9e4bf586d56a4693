"""The self-check's value tests, run on the bytes as they are written, while the other shards are still written.

The checker that runs at the end of an export (:mod:`.self_check`) reads back the values of many tensors:
every block scale (1.9 GB of an NVFP4 Qwen3-30B-A3B export), the unquantized float tensors and every
one-element tensor. Read back after the files are written with ``O_DIRECT``, that is a second pass over
the disk. Instead, each shard's writer thread hands the bytes it copies into the write buffer (the bytes
the file gets) to a :class:`ShardWitness`, which gathers them per dtype and tests each batch of up to
:data:`BATCH_BYTES` with the checker's own tests (:mod:`quantport.check.rules.scale_values`,
:func:`~quantport.formats.finite.all_finite`); a tensor larger than :data:`TAPPED_BYTES` is tested on its
own: piece by piece in the write buffer when it is on the CPU, whole on its device (its bytes are the file's)
when it is on a GPU. The results
(:class:`~quantport.check.witnessed.WitnessedValues`) go to the checker, which then reads only the
tensors of a batch that was not clean, and reports on them exactly as it would have without this.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Flag, auto

import torch

from ..check.checkpoint import DTYPE_BYTES, TORCH_DTYPES
from ..check.rules.scale_values import clean_dtypes
from ..check.rules.scales import SCALAR_SCALE_DTYPES, is_scale_name
from ..check.rules.weights import FLOAT_DTYPES
from ..check.scalars import SCALAR_DTYPES
from ..check.tensor_batch import TensorBatch
from ..check.witnessed import WitnessedValues
from ..formats.finite import all_finite
from .checkpoint_file import CheckpointFile

__all__ = ["BATCH_BYTES", "TAPPED_BYTES", "ShardWitness", "ValueKind", "ValueWitness", "WrittenTensor", "value_kind"]

logger = logging.getLogger(__name__)

BATCH_BYTES = 64 << 20
"""Bytes of one kind gathered before they are tested (the checker's batch size)."""
TAPPED_BYTES = 1 << 20
"""Tensors up to this size are tested on the bytes copied into the write buffer; larger ones on their tensor."""


@dataclass(frozen=True)
class WrittenTensor:
    """A tensor on its way to a shard: name, safetensors dtype, number of elements."""

    name: str
    dtype: str
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


class ValueKind(Flag):
    """Which of the checker's value tests a tensor gets."""

    NONE = 0
    SCALAR = auto()
    """A one-element tensor: its float32 value (the per-tensor scale, group and MoE rules compare values)."""
    SCALE = auto()
    """A scale tested as an array: finite, not negative; E8M0 never 255 (``scale.*`` rules)."""
    FLOAT = auto()
    """An unquantized float tensor: finite (``weight.not-finite``)."""


def value_kind(name: str, dtype: str, numel: int) -> ValueKind:
    """The tests tensor ``name`` (safetensors ``dtype``, ``numel`` elements) gets from the checker."""
    kind = ValueKind.SCALAR if numel == 1 and dtype in SCALAR_DTYPES else ValueKind.NONE
    if is_scale_name(name):
        if not (numel == 1 and dtype in SCALAR_SCALE_DTYPES):
            kind |= ValueKind.SCALE
    elif dtype in FLOAT_DTYPES and numel > 0:
        kind |= ValueKind.FLOAT
    return kind


class _Gathered:
    """Bytes of one kind, per dtype, with the names of the tensors they hold, in order."""

    def __init__(self) -> None:
        self.raw: dict[str, bytearray] = {}
        self.names: dict[str, list[str]] = {}
        self.size = 0

    def start(self, name: str, dtype: str) -> bytearray:
        self.names.setdefault(dtype, []).append(name)
        return self.raw.setdefault(dtype, bytearray())

    def take(self) -> list[tuple[str, torch.Tensor, list[str]]]:
        """(dtype, uint8 bytes, names) per dtype, emptying the gathered bytes."""
        out = [(d, torch.frombuffer(r, dtype=torch.uint8), self.names[d]) for d, r in self.raw.items() if r]
        self.raw, self.names, self.size = {}, {}, 0
        return out


class ValueWitness:
    """Collects what the shards' witnesses established; :meth:`result` hands it to the checker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clean: set[str] = set()
        self._scalars: dict[str, float] = {}

    def shard(self) -> ShardWitness:
        """A witness for one shard (used by that shard's writer thread only)."""
        return ShardWitness(self)

    def add(self, clean: set[str], scalars: dict[str, float]) -> None:
        with self._lock:
            self._clean |= clean
            self._scalars.update(scalars)

    def result(self) -> WitnessedValues:
        with self._lock:
            return WitnessedValues(frozenset(self._clean), dict(self._scalars))


class ShardWitness:
    """Writes tensors to a shard and tests the bytes of those the checker would read back (module docstring)."""

    def __init__(self, sink: ValueWitness) -> None:
        self._sink = sink
        self._gathered = {kind: _Gathered() for kind in (ValueKind.SCALAR, ValueKind.SCALE, ValueKind.FLOAT)}
        self._clean: set[str] = set()
        self._scalars: dict[str, float] = {}

    def write(self, handle: CheckpointFile, tensors: Sequence[WrittenTensor], data: torch.Tensor) -> None:
        """``handle.write(data)``, ``data`` being the flat uint8 bytes of ``tensors`` back to back, testing the
        values on the way."""
        kinds = [value_kind(t.name, t.dtype, t.numel) for t in tensors]
        if not any(kinds):
            handle.write(data)
            return
        if len(tensors) == 1 and data.numel() > TAPPED_BYTES and ValueKind.SCALAR not in kinds[0]:
            self._write_large(handle, kinds[0], tensors[0], data)
            return
        spans: list[tuple[int, int, list[bytearray]]] = []
        offset = 0
        for tensor, kind in zip(tensors, kinds, strict=True):
            end = offset + tensor.nbytes
            if kind:
                sinks = []
                for k, gathered in self._gathered.items():
                    if k in kind:
                        sinks.append(gathered.start(tensor.name, tensor.dtype))
                        gathered.size += end - offset
                spans.append((offset, end, sinks))
            offset = end
        handle.write(data, _SplitTap(spans))
        for k, gathered in self._gathered.items():
            if gathered.size >= BATCH_BYTES:
                self._test(k)

    def close(self) -> None:
        """Test what is still gathered and hand the results to the :class:`ValueWitness`."""
        for kind in self._gathered:
            self._test(kind)
        self._sink.add(self._clean, self._scalars)

    def _write_large(self, handle: CheckpointFile, kind: ValueKind, tensor: WrittenTensor, data: torch.Tensor) -> None:
        """A tensor over :data:`TAPPED_BYTES`: on a GPU, tested whole on its device after the write; on the CPU,
        piece by piece as the write buffer receives it (testing the source afterwards would fault a memory-mapped
        weight's pages back in after the writer released them)."""
        dtype = tensor.dtype
        if data.device.type == "cpu":
            stream = _StreamTest(lambda part: _clean(kind, dtype, part), DTYPE_BYTES[dtype])
            handle.write(data, stream)
            clean = stream.clean
        else:
            handle.write(data)
            clean = _clean(kind, dtype, data)
        if clean:
            self._clean.add(tensor.name)

    def _test(self, kind: ValueKind) -> None:
        for dtype, raw, names in self._gathered[kind].take():
            try:
                if kind is ValueKind.SCALAR:
                    values = raw.view(TORCH_DTYPES[dtype]).to(torch.float32).tolist()
                    self._scalars.update(zip(names, values, strict=True))
                elif kind is ValueKind.SCALE:
                    if dtype in clean_dtypes(TensorBatch(buffers={dtype: raw})):
                        self._clean.update(names)
                elif all_finite(raw.view(TORCH_DTYPES[dtype])):
                    self._clean.update(names)
            except Exception:  # a test that fails leaves the tensors to the checker
                logger.debug("%s %s values not tested; the checker reads them back", kind, dtype, exc_info=True)


class _SplitTap:
    """Hands each tensor's part of the pieces a file write passes through to that tensor's sinks.

    ``spans``: (first byte, end byte, sinks) of the tensors to gather, in order, in the bytes of one write."""

    def __init__(self, spans: list[tuple[int, int, list[bytearray]]]) -> None:
        self._spans = spans
        self._index = 0
        self._position = 0

    def __call__(self, piece: memoryview) -> None:
        start = self._position
        end = self._position = start + len(piece)
        while self._index < len(self._spans) and self._spans[self._index][0] < end:
            first, last, sinks = self._spans[self._index]
            lo, hi = max(first, start), min(last, end)
            if lo < hi:
                part = piece[lo - start : hi - start]
                for sink in sinks:
                    sink.extend(part)
            if last > end:
                break
            self._index += 1


def _clean(kind: ValueKind, dtype: str, raw: torch.Tensor) -> bool:
    """The checker's test of ``kind`` on the bytes ``raw`` (uint8, whole elements of ``dtype``); False when the
    test itself fails (the checker then reads the tensor back)."""
    try:
        if ValueKind.SCALE in kind:
            return dtype in clean_dtypes(TensorBatch(buffers={dtype: raw}))
        return all_finite(raw.view(TORCH_DTYPES[dtype]))
    except Exception:
        logger.debug("%s %s values not tested; the checker reads them back", kind, dtype, exc_info=True)
        return False


class _StreamTest:
    """Runs an elementwise test on the pieces of one tensor's bytes as a file write passes them, carrying the
    bytes of an element split between two pieces to the next; ``clean`` is whether every part passed."""

    def __init__(self, test, itemsize: int) -> None:
        self._test, self._itemsize = test, itemsize
        self._carry = bytearray()
        self.clean = True

    def __call__(self, piece: memoryview) -> None:
        if not self.clean:
            return
        buffer = self._carry + piece  # a copy of at most one chunk; aligned for any dtype
        whole = len(buffer) // self._itemsize * self._itemsize
        self._carry = buffer[whole:]
        if whole and not self._test(torch.frombuffer(buffer, dtype=torch.uint8)[:whole]):
            self.clean = False
