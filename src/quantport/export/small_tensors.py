"""Consecutive small tensors of a shard written as one: one copy into the write buffer instead of one per tensor.

A Qwen3-30B-A3B NVFP4 export holds 74,000 tensors, 55,000 of them a few bytes to a few kilobytes (per-tensor
and block scales of every expert projection). Written one by one, each costs a queue hand-off to the writer
thread and, on a GPU, a synchronous device-to-host copy: tens of microseconds apiece, with the interpreter lock
held for much of it, in every shard's threads. Gathered on their own device (a device-to-device copy, queued
without waiting) into one buffer of up to :data:`GROUP_BYTES`, they reach the writer as one tensor; the file's
bytes are the same, in the same order.
"""

from __future__ import annotations

import torch

from .value_witness import WrittenTensor

__all__ = ["GATHERED_BYTES", "GROUP_BYTES", "SmallTensorGroup"]

GATHERED_BYTES = 256 << 10
"""Tensors up to this size are gathered with their neighbours; larger ones are written on their own (a
Qwen3-30B-A3B expert projection's NVFP4 block scales are 96 KB, its packed weight 768 KB)."""
GROUP_BYTES = 4 << 20
"""One group's buffer."""


class SmallTensorGroup:
    """Small tensors of one device, back to back in one buffer on that device (one shard's compute thread)."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._used = 0
        self.tensors: list[WrittenTensor] = []

    def __len__(self) -> int:
        return len(self.tensors)

    def accepts(self, data: torch.Tensor) -> bool:
        """Whether ``data`` (flat uint8) is small and on the device of the tensors gathered so far."""
        return data.numel() <= GATHERED_BYTES and (self._buffer is None or data.device == self._buffer.device)

    def add(self, tensor: WrittenTensor, data: torch.Tensor) -> None:
        """Append the bytes ``data`` of ``tensor`` (copied now: the caller may drop ``data``)."""
        if self._buffer is None:
            self._buffer = torch.empty(GROUP_BYTES, dtype=torch.uint8, device=data.device)
        n = data.numel()
        self._buffer[self._used : self._used + n].copy_(data, non_blocking=data.device.type != "cpu")
        self._used += n
        self.tensors.append(tensor)

    @property
    def full(self) -> bool:
        """True when the next small tensor might not fit."""
        return self._used > GROUP_BYTES - GATHERED_BYTES

    def take(self) -> tuple[list[WrittenTensor], torch.Tensor]:
        """The tensors gathered and their bytes (flat uint8 on their device); the group starts empty again."""
        assert self._buffer is not None, "take() of an empty group"
        out = (self.tensors, self._buffer[: self._used])
        self._buffer, self._used, self.tensors = None, 0, []
        return out
