"""What an export plans to write: each tensor's name, spec and how to compute it (alone or with its neighbours),
in the order the files hold them."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..schemes import TensorSpec

__all__ = ["SAFETENSORS_DTYPES", "OneSlotCache", "PlannedTensor", "TensorRun", "natural_order"]

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


_DIGITS = re.compile(r"(\d+)")


def natural_order(name: str) -> tuple[str | int, ...]:
    """Sort key reading digit runs as numbers: ``experts.2`` before ``experts.10``, so experts quantized
    in consecutive chunks are written chunk by chunk."""
    parts = _DIGITS.split(name)
    parts[1::2] = map(int, parts[1::2])
    return tuple(parts)
