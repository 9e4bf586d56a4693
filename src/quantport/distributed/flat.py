"""Many small named tensors as one flat buffer and back, so that one collective reduces all of them.

:func:`flatten` lays the tensors out in sorted-name order (the same on every rank) in one 1-D buffer of one
dtype on the collective's device; :func:`unflatten` cuts the buffer back into new tensors of the original
shapes, dtypes and devices. Neither synchronises with the host per tensor: the tensors already on the
buffer's device are concatenated on it, and those elsewhere (the token counts kept on the CPU under NCCL)
cross in one copy per source device each way. No collective here: :mod:`.statistics` reduces the buffer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["FlatSlot", "flatten", "unflatten"]


@dataclass(frozen=True, slots=True)
class FlatSlot:
    """Where one named tensor lies in a flat buffer, and what it is outside of it."""

    name: str
    start: int
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @property
    def stop(self) -> int:
        return self.start + self.shape.numel()


def _slots(named: Mapping[str, torch.Tensor]) -> tuple[FlatSlot, ...]:
    slots, start = [], 0
    for name in sorted(named):
        tensor = named[name]
        slots.append(FlatSlot(name, start, tensor.shape, tensor.dtype, tensor.device))
        start += tensor.numel()
    return tuple(slots)


def _by_device(slots: tuple[FlatSlot, ...], device: torch.device) -> dict[torch.device, list[FlatSlot]]:
    """The slots whose tensor is not on ``device``, by the device it is on."""
    away: dict[torch.device, list[FlatSlot]] = {}
    for slot in slots:
        if slot.device != device:
            away.setdefault(slot.device, []).append(slot)
    return away


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-to-GPU copy goes through pinned memory, asynchronously (a pageable one waits for the GPU)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@torch.no_grad()
def flatten(
    named: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, tuple[FlatSlot, ...]]:
    """``named`` in one new 1-D ``dtype`` buffer on ``device`` (values converted to ``dtype``), and where each lies.

    The buffer never shares memory with an input, so the caller may reduce it in place."""
    slots = _slots(named)
    if not slots:
        return torch.empty(0, dtype=dtype, device=device), slots
    pieces = {}
    for slot in slots:
        piece = named[slot.name].reshape(-1)
        pieces[slot.name] = piece if piece.dtype == dtype else piece.to(dtype)
    for group in _by_device(slots, device).values():  # one copy per source device, not one per tensor
        staged = _to(torch.cat([pieces[slot.name] for slot in group]), device)
        pieces.update(zip((s.name for s in group), staged.split([s.shape.numel() for s in group]), strict=True))
    return torch.cat([pieces[slot.name] for slot in slots]), slots


@torch.no_grad()
def unflatten(flat: torch.Tensor, slots: tuple[FlatSlot, ...]) -> dict[str, torch.Tensor]:
    """New tensors cut from ``flat`` (none is a view of it), each with its slot's shape, dtype and device."""
    parts = dict(zip((s.name for s in slots), flat.split([s.shape.numel() for s in slots]), strict=True))
    for device, group in _by_device(slots, flat.device).items():  # one copy per destination device
        staged = torch.cat([parts[slot.name] for slot in group]).to(device)
        parts.update(zip((s.name for s in group), staged.split([s.shape.numel() for s in group]), strict=True))
    return {slot.name: parts[slot.name].view(slot.shape).to(dtype=slot.dtype, copy=True) for slot in slots}
