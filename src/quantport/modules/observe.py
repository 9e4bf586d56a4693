"""Running absolute-maximum statistics, kept on the tensor's device (no host synchronisation)."""

from __future__ import annotations

import torch

__all__ = ["forget_last_input", "update_amax", "update_shared_input_amax"]


def update_amax(running: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """max(running, max|x|) as an fp32 0-d tensor; one pass over ``x`` and no temporary |x|."""
    lo, hi = torch.aminmax(x.detach())
    amax = torch.maximum(hi.float(), -lo.float())
    return amax if running is None else torch.maximum(running, amax)


class _LastInput:
    """The amax of the last activation observed, kept with a reference to that very tensor.

    Sibling projections (q/k/v, gate/up) are called one after the other on the same input tensor; the
    reference keeps that tensor alive, so an identity check (plus its version counter, for in-place
    changes) is exact: the siblings share one pass over the activations instead of one each.
    """

    tensor: torch.Tensor | None = None
    version: int = -1
    amax: torch.Tensor | None = None


def update_shared_input_amax(running: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """:func:`update_amax` for Linear inputs, computing max|x| once per input tensor."""
    if x.is_inference():  # no version counter: nothing proves the tensor is unchanged
        return update_amax(running, x)
    if _LastInput.tensor is not x or _LastInput.version != x._version:
        _LastInput.tensor, _LastInput.version = x, x._version
        _LastInput.amax = update_amax(None, x)
    amax = _LastInput.amax
    return amax if running is None else torch.maximum(running, amax)


def forget_last_input() -> None:
    """Drop the reference to the last observed activation (call when calibration ends)."""
    _LastInput.tensor, _LastInput.version, _LastInput.amax = None, -1, None
