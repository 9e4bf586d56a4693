"""Per-channel statistics of shared inputs, and a uniform sample of their rows, from one calibration forward.

AWQ needs each input's mean |x| per channel and a sample of tokens to score candidate scales on;
SmoothQuant needs the max |x| per channel. The sample keeps at most ``2 * max_tokens`` rows at any time:
every batch contributes a random ``keep`` fraction of its rows, and when the sample outgrows the bound it
is halved at random and ``keep`` halves, so every token seen has the same chance to be kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["InputStatistics", "InputStatisticsObserver"]


@dataclass
class InputStatistics:
    """Running statistics of one input ``[..., channels]``.

    Attributes:
        max_tokens: the sample's target size.
        abs_sum: fp32 ``[channels]`` sum of |x| over all tokens.
        abs_max: fp32 ``[channels]`` max of |x| over all tokens.
        tokens: tokens seen.
        rows: sampled rows (the input's dtype), each ``[n, channels]``.
        keep: the fraction of each new batch's rows that is sampled.
    """

    max_tokens: int
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    abs_sum: Tensor | None = None
    abs_max: Tensor | None = None
    tokens: int = 0
    rows: list[Tensor] = field(default_factory=list)
    keep: float = 1.0

    def add(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        magnitude = flat.float().abs()
        total, top = magnitude.sum(dim=0), magnitude.amax(dim=0)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.abs_max = top if self.abs_max is None else torch.maximum(self.abs_max, top)
        self.tokens += flat.shape[0]
        take = max(1, round(flat.shape[0] * self.keep))
        picked = torch.randperm(flat.shape[0], generator=self.generator)[:take].to(flat.device)
        self.rows.append(flat[picked].cpu().clone())
        if sum(r.shape[0] for r in self.rows) > 2 * self.max_tokens:
            self.rows = [self._draw(torch.cat(self.rows), self.max_tokens)]
            self.keep /= 2

    def _draw(self, rows: Tensor, count: int) -> Tensor:
        return rows[torch.randperm(rows.shape[0], generator=self.generator)[:count]]

    def sample(self) -> Tensor:
        """At most ``max_tokens`` sampled rows ``[n, channels]`` (the input's dtype, on the CPU)."""
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, 0)
        return self._draw(rows, self.max_tokens) if rows.shape[0] > self.max_tokens else rows

    def abs_mean(self) -> Tensor:
        """fp32 ``[channels]`` mean |x|."""
        assert self.abs_sum is not None
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class InputStatisticsObserver:
    """Hooks recording :class:`InputStatistics` of modules' outputs (norms) or inputs (Linears)."""

    statistics: dict[str, InputStatistics] = field(default_factory=dict)
    handles: list[RemovableHandle] = field(default_factory=list)

    @classmethod
    def attach(
        cls, model: nn.Module, outputs: list[str], inputs: list[str], max_tokens: int
    ) -> InputStatisticsObserver:
        """Observe the outputs of the modules named in ``outputs`` and the first inputs of those in ``inputs``."""
        observer = cls()
        modules = dict(model.named_modules())
        for name in outputs:
            stats = observer.statistics[name] = InputStatistics(max_tokens)
            observer.handles.append(modules[name].register_forward_hook(_output_hook(stats)))
        for name in inputs:
            stats = observer.statistics[name] = InputStatistics(max_tokens)
            observer.handles.append(modules[name].register_forward_pre_hook(_input_hook(stats)))
        return observer

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _output_hook(stats: InputStatistics):  # noqa: ANN202  (a forward hook)
    def record(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        stats.add(output[0] if isinstance(output, tuple) else output)

    return record


def _input_hook(stats: InputStatistics):  # noqa: ANN202  (a forward pre-hook)
    def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        stats.add(args[0])

    return record
