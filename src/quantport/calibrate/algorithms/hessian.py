"""Hessians of Linear layers' inputs, accumulated during the calibration forward by forward pre-hooks.

For a Linear with inputs ``X`` ``[tokens, in]`` the layer-wise reconstruction loss ``||X W^T - X Q^T||^2``
has Hessian ``2 X^T X`` with respect to each output row; GPTQ only needs it up to a factor, so the mean
``X^T X / tokens`` is kept, in fp32 ``[in, in]``. Members of a fused group (q/k/v, gate/up) read the same
input, so one accumulator serves them all and only the first member carries the hook.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["HessianAccumulator", "HessianObserver"]


@dataclass
class HessianAccumulator:
    """Running ``X^T X`` of one input (fp32 ``[in, in]``) and the number of tokens (rows of ``X``) in it."""

    in_features: int
    device: torch.device
    sum: Tensor | None = None
    tokens: int = 0

    def add(self, x: Tensor) -> None:
        """Add the inputs ``x`` ``[..., in]`` (any float dtype)."""
        rows = x.detach().reshape(-1, self.in_features).float()
        if self.sum is None:
            self.sum = torch.zeros(self.in_features, self.in_features, device=self.device)
        self.sum.addmm_(rows.T, rows)
        self.tokens += rows.shape[0]

    def hessian(self) -> Tensor | None:
        """``X^T X / tokens`` (fp32 ``[in, in]``), or None when no token was seen."""
        if self.sum is None or self.tokens == 0:
            return None
        return self.sum / self.tokens


@dataclass
class HessianObserver:
    """Forward pre-hooks recording the Hessian of every named Linear's input during one calibration run."""

    accumulators: dict[str, HessianAccumulator] = field(default_factory=dict)
    handles: list[RemovableHandle] = field(default_factory=list)

    @classmethod
    def attach(cls, modules: dict[str, nn.Linear], groups: Iterable[Sequence[str]] = ()) -> HessianObserver:
        """Hook ``modules`` (name -> Linear); names in one of ``groups`` share their first member's accumulator."""
        observer = cls()
        shared: dict[str, str] = {}
        for members in groups:
            present = [m for m in members if m in modules]
            for member in present[1:]:
                shared[member] = present[0]
        for name, module in modules.items():
            if name in shared:
                continue
            accumulator = HessianAccumulator(module.in_features, module.weight.device)
            observer.accumulators[name] = accumulator
            observer.handles.append(module.register_forward_pre_hook(_hook(accumulator)))
        for member, first in shared.items():
            observer.accumulators[member] = observer.accumulators[first]
        return observer

    def detach(self) -> None:
        """Remove the hooks (the accumulated Hessians stay)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _hook(accumulator: HessianAccumulator):  # noqa: ANN202  (a forward pre-hook)
    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        accumulator.add(args[0])

    return record
