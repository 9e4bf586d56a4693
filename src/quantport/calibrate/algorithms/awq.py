"""AWQ (Lin et al., 2023): per-input-channel scales searched against the output error of the quantized readers.

For one shared input ``X`` (sampled calibration tokens) and its readers ``W_i`` (the Linears and experts that
read it), each strength ``alpha`` on a grid in [0, 1] gives the scale
``s = mean|x|^alpha / mean|w|^(1 - alpha)`` (normalised so that ``sqrt(max s * min s) = 1``), where ``mean|w|``
is each input channel's mean magnitude over the readers' rows, each row measured against its own max. The
candidate's error is ``sum_i ||X W_i^T - fq(X / s) Q(W_i * s)^T||^2`` with the recipe's own codec ``Q`` (and
activation fake-quantization ``fq`` where the recipe quantizes activations); scale 1 is scored too, so the
chosen scale is never worse on the sample than none. Experts are scored on the sampled tokens the router
sends them (its top-k), dense readers on all.

With ``clip``, each quantized Linear's scale units (groups or rows) are then clipped to the ratio of their
max |w| that minimises ``||X_u (w_u - Q(w_u))||^2`` on the (scaled) inputs of the unit's columns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ...algorithm_options import AwqOptions
from ...formats.descriptors import ScaleGranularity
from ...schemes import SchemeCodec
from .units import ScaleUnits, unit_bounds

__all__ = [
    "AwqChoice",
    "Reader",
    "Scorer",
    "awq_clipped_weight",
    "awq_scale",
    "fake_quantized_input",
    "fake_quantized_weight",
    "groups_fit",
]

logger = logging.getLogger(__name__)

_ROW_CHUNK = 256


@dataclass(frozen=True, slots=True)
class Reader:
    """A quantized reader of a shared input.

    Attributes:
        weight: ``[out, in]`` in the model dtype (``in`` = the input's channels).
        rows: indices of the sampled tokens that reach it (None: all of them).
        row_weights: fp32 ``[len(rows)]`` routing weight of each of those tokens (None: 1): its rows of the
            input are multiplied by it when scored, so a token's error counts as much as it moves the output
            (an expert's output, or its input, is multiplied by the router's weight).
    """

    weight: Tensor
    rows: Tensor | None = None
    row_weights: Tensor | None = None


@dataclass(frozen=True, slots=True)
class AwqChoice:
    """The scale chosen for one shared input, with its strength (None: scale 1 won) and relative error."""

    scale: Tensor
    alpha: float | None
    error: float
    error_unscaled: float


class Scorer(Protocol):
    """The output error of a candidate column scale ``[in]`` (scale 1 included)."""

    def error(self, column: Tensor) -> float: ...


def fake_quantized_weight(codec: SchemeCodec, weight: Tensor) -> Tensor:
    amax = weight.float().abs().amax()
    return codec.dequantize_weight(codec.quantize_weight(weight, amax), weight.dtype).float()


def fake_quantized_input(codec: SchemeCodec, x: Tensor, dtype: torch.dtype) -> Tensor:
    x = x.to(dtype)
    scale = codec.input_scale(x.float().abs().amax()) if codec.static_input_scale else None
    return codec.fake_quantize_input(x, scale).float()


@dataclass(frozen=True, slots=True)
class _Segment:
    """Consecutive readers that see the same tokens: one matmul (their rows ``start:stop`` of the stacked weight)."""

    rows: Tensor | None
    row_weights: Tensor | None
    start: int
    stop: int


class _Scorer:
    """Output error of a candidate scale over all readers: one codec call on the stacked scaled weights
    (the stack shares one per-tensor amax: NVFP4's global scale is approximated by the largest), one
    matmul per token set."""

    def __init__(self, codec: SchemeCodec, sample: Tensor, readers: list[Reader]) -> None:
        self.codec, self.sample = codec, sample.float()
        self.dtype = readers[0].weight.dtype
        self.weight = torch.cat([r.weight.float() for r in readers])
        self.segments: list[_Segment] = []
        offset = 0
        for reader in readers:
            rows = reader.weight.shape[0]
            last = self.segments[-1] if self.segments else None
            if last is not None and last.rows is reader.rows and last.row_weights is reader.row_weights:
                self.segments[-1] = _Segment(last.rows, last.row_weights, last.start, offset + rows)
            else:
                self.segments.append(_Segment(reader.rows, reader.row_weights, offset, offset + rows))
            offset += rows
        self.references = [self._x(self.sample, s) @ self.weight[s.start : s.stop].T for s in self.segments]

    @staticmethod
    def _x(x: Tensor, segment: _Segment) -> Tensor:
        x = x if segment.rows is None else x[segment.rows]
        return x if segment.row_weights is None else x * segment.row_weights.to(x.device)[:, None]

    def error(self, column: Tensor) -> float:
        quantized = fake_quantized_weight(self.codec, (self.weight * column).to(self.dtype))
        x = fake_quantized_input(self.codec, self.sample / column, self.dtype)
        total = 0.0
        for segment, reference in zip(self.segments, self.references, strict=True):
            out = self._x(x, segment) @ quantized[segment.start : segment.stop].T
            total += float((reference - out).square().sum())
        return total


def _weight_magnitude(readers: list[Reader], group: int | None) -> Tensor:
    """fp32 ``[in]``: each input channel's mean |w| over the readers' rows, each unit measured against its max."""
    parts = []
    for reader in readers:
        w = reader.weight.float().abs()
        if group:
            units = w.reshape(w.shape[0], -1, group)
            w = (units / units.amax(dim=-1, keepdim=True).clamp(min=1e-12)).reshape(w.shape)
        else:
            w = w / w.amax(dim=-1, keepdim=True).clamp(min=1e-12)
        parts.append(w.mean(dim=0) * w.shape[0])
    rows = sum(r.weight.shape[0] for r in readers)
    return torch.stack(parts).sum(dim=0) / rows


def awq_scale(
    codec: SchemeCodec,
    sample: Tensor,
    input_magnitude: Tensor,
    readers: list[Reader],
    options: AwqOptions,
    reduce: Callable[[Tensor], Tensor] = lambda t: t,
    expand: Callable[[Tensor], Tensor] = lambda t: t,
    scorer: Scorer | None = None,
) -> AwqChoice:
    """The AWQ scale of one shared input.

    Args:
        codec: the recipe's codec.
        sample: sampled input rows ``[n, in]`` (any float dtype).
        input_magnitude: fp32 mean |x| per scale entry (``reduce``d already).
        readers: the quantized readers.
        options: the alpha grid.
        reduce: per-column statistic ``[in]`` -> per scale entry (o_proj: mean over the query heads of a kv head).
        expand: scale ``[entries]`` -> per-column ``[in]`` (o_proj: repeated per query head).
        scorer: what scores the candidates (None: the readers' summed output error on ``sample``).
    """
    sample = sample.float()
    group = codec.format.block_size if codec.format.granularity is ScaleGranularity.GROUP else None
    w_magnitude = reduce(_weight_magnitude(readers, group))
    x_magnitude = input_magnitude.float().clamp(min=1e-8)
    w_magnitude = w_magnitude.clamp(min=1e-8)
    ones = torch.ones_like(x_magnitude)
    scorer = scorer if scorer is not None else _Scorer(codec, sample, readers)
    unscaled = scorer.error(expand(ones))
    best = AwqChoice(ones, None, unscaled, unscaled)
    for alpha in options.alphas():
        scale = (x_magnitude.pow(alpha) / w_magnitude.pow(1 - alpha)).clamp(min=1e-4)
        scale = scale / (scale.max() * scale.min()).sqrt()
        error = scorer.error(expand(scale))
        if error < best.error:
            best = AwqChoice(scale, alpha, error, unscaled)
    return best


def groups_fit(codec: SchemeCodec, in_features: int) -> bool:
    """Whether ``in_features`` input channels split into the codec's groups (always, without groups)."""
    group = codec.format.block_size if codec.format.granularity is ScaleGranularity.GROUP else None
    return not group or in_features % group == 0


def _unit_errors(x: Tensor, delta: Tensor, units: ScaleUnits) -> Tensor:
    """``[units]`` output error of each unit: ``sum_n (x_n[unit columns] . delta[unit])^2``."""
    out_features, in_features = delta.shape
    if units.granularity is ScaleGranularity.CHANNEL:
        zero = torch.zeros(out_features, device=delta.device)
        return sum(((chunk @ delta.T).square().sum(dim=0) for chunk in x.split(_ROW_CHUNK)), zero)
    groups = in_features // units.block
    d = delta.reshape(out_features, groups, units.block)
    total = torch.zeros(out_features, groups, device=delta.device)
    for chunk in x.split(_ROW_CHUNK):
        total += torch.einsum("ngk,ogk->nog", chunk.reshape(-1, groups, units.block), d).square().sum(dim=0)
    return total.reshape(-1)


def clip_supported(codec: SchemeCodec) -> bool:
    """Whether AWQ's clipping search applies (group or channel scales)."""
    return codec.format.granularity in (ScaleGranularity.GROUP, ScaleGranularity.CHANNEL)


def awq_clipped_weight(
    codec: SchemeCodec, weight: Tensor, weight_amax: Tensor, x: Tensor, options: AwqOptions
) -> Tensor:
    """``weight`` ``[out, in]`` with every scale unit clamped to the ratio of its bounds that minimises the
    output error on the inputs ``x`` ``[n, in]`` (the codec quantizes the result with the clipped scales)."""
    units = ScaleUnits.of(codec.format)
    shape = tuple(weight.shape)
    original = units.split(weight)
    lo, hi = unit_bounds(original, codec.format.symmetric)
    x = x.float().to(weight.device)
    best_error = torch.full((original.shape[0],), float("inf"), device=weight.device)
    best = original.clone()
    for ratio in options.clip_ratios():
        clipped = units.merge(torch.clamp(original, lo * ratio, hi * ratio), shape).to(weight.dtype)
        decoded = codec.dequantize_weight(codec.quantize_weight(clipped, weight_amax), weight.dtype).float()
        error = _unit_errors(x, decoded - weight.float(), units)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better[:, None], units.split(clipped), best)
    return units.merge(best, shape).to(weight.dtype)
