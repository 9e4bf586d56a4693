"""Reduce a named set of calibration statistics over all ranks: maxima by MAX, counts and sums by SUM.

The generic step behind the whole-model path (:mod:`.model_statistics`) and the one a layer-sequential path
calls per layer: build a :class:`Statistics` from what this rank observed, call :func:`reduce_statistics`
after the ranks agreed that calibration succeeded, and write the result back. Every rank must pass the same
names with the same shapes and dtypes (they are the same model); the result is the same on every rank.

* ``maximum`` (amax values): MAX. ``None`` means "never observed" and counts as a scalar ``-inf``; a name
  that no rank observed is ``None`` after the reduction. NaN is carried as ``+inf`` (gloo's MAX does not
  propagate NaN), so a non-finite statistic stays non-finite. MAX of the same numbers in any order is the
  same number: the reduced amax is bit-equal to a single process's over the same batches.
* ``sums`` (token counts, Hessian sums): SUM. Integer sums are exact. Floating-point sums are added in a
  different order than one process adds its batches, so they equal a single process's up to rounding
  (about 1e-7 relative in fp32), not bit for bit. (GPTQ on the tiny test Llama, w4a16, 5 batches: 0 of
  170,908 checkpoint values differed with 2 and with 3 ranks; a larger model can move a few codes.)

Small tensors travel in one flat buffer per (op, dtype) on the collective's device (:mod:`.flat`), reduced
by one collective each: the maxima in one fp32 buffer, the sums in one per dtype (int64 counts, fp32 sums);
tensors of 1M elements or more (Hessians) are reduced in place one by one, so no second copy of them is made.
No host synchronisation per tensor: the counts kept on the CPU cross to the GPU and back in one copy each
way, and only a rank that holds unobserved maxima reads values back, all of them at once.

A world of one rank skips the collectives themselves (reducing over one rank is the identity, and NCCL would
create its communicator at the first one); everything else (votes, buffers, write-back) runs as with more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .flat import flatten, unflatten
from .session import RankSession

__all__ = ["LARGE_TENSOR", "Statistics", "reduce_statistics"]

LARGE_TENSOR = 1 << 20
"""Elements from which a tensor is reduced on its own instead of in the flat buffer."""

_NEVER = float("-inf")
"""What an unobserved maximum (None) counts as."""


@dataclass
class Statistics:
    """Named calibration statistics of one rank (see the module docstring)."""

    maximum: dict[str, torch.Tensor | None] = field(default_factory=dict)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


def _all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp, session: RankSession) -> None:
    """``tensor`` reduced over every rank, in place; left as it is in a world of one (the identity)."""
    if session.world_size > 1:
        dist.all_reduce(tensor, op=op)


def _nan_as_inf_(tensor: torch.Tensor) -> torch.Tensor:
    """NaN becomes +inf in place (gloo's MAX drops NaN; +inf keeps the statistic non-finite)."""
    return torch.nan_to_num_(tensor, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))


def _reduce_named(
    named: Mapping[str, torch.Tensor],
    op: dist.ReduceOp,
    session: RankSession,
    device: torch.device,
    buffer_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of ``named`` reduced by ``op``: the large ones one by one, the others in one flat buffer per
    dtype (``buffer_dtype``: one buffer of that dtype for all, each converted back after). Maxima carry NaN as
    +inf."""
    maxima = op == dist.ReduceOp.MAX
    reduced: dict[str, torch.Tensor] = {}
    groups: dict[torch.dtype, dict[str, torch.Tensor]] = {}
    for name in sorted(named):  # the same order on every rank
        tensor = named[name]
        if tensor.numel() >= LARGE_TENSOR:
            on_device = tensor.detach().to(device, buffer_dtype or tensor.dtype, copy=maxima)
            if maxima:
                _nan_as_inf_(on_device)
            _all_reduce_(on_device, op, session)  # in place: a sum already on the device is not copied
            reduced[name] = on_device.to(tensor.device, tensor.dtype)
        else:
            groups.setdefault(buffer_dtype or tensor.dtype, {})[name] = tensor
    for dtype in sorted(groups, key=str):  # the same order on every rank
        flat, slots = flatten(groups[dtype], device, dtype)
        if maxima:
            _nan_as_inf_(flat)
        _all_reduce_(flat, op, session)
        reduced.update(unflatten(flat, slots))
    return reduced


def _never_observed(reduced: Mapping[str, torch.Tensor]) -> set[str]:
    """The names whose reduced maximum is still -inf: no rank observed them. One host read for all."""
    if not reduced:
        return set()
    names = sorted(reduced)
    flags = torch.cat([reduced[name].reshape(-1) for name in names]).eq(_NEVER).tolist()
    return {name for name, flag in zip(names, flags, strict=True) if flag}


def reduce_statistics(statistics: Statistics, session: RankSession) -> Statistics:
    """MAX of ``statistics.maximum`` and SUM of ``statistics.sums`` over every rank (a new :class:`Statistics`)."""
    device = session.collective_device()
    unobserved = [name for name, value in statistics.maximum.items() if value is None]
    maxima = {
        name: torch.full((), _NEVER, dtype=torch.float32, device=device) if value is None else value
        for name, value in statistics.maximum.items()
    }
    reduced_max = _reduce_named(maxima, dist.ReduceOp.MAX, session, device, buffer_dtype=torch.float32)
    never = _never_observed({name: reduced_max[name] for name in unobserved})  # observed here: never -inf
    out = Statistics()
    out.maximum = {name: None if name in never else reduced_max[name] for name in statistics.maximum}
    out.sums = _reduce_named(statistics.sums, dist.ReduceOp.SUM, session, device)
    return out
