"""Scheme codecs: the bridge between a :class:`~quantport.recipes.LinearScheme` and tensors.

A codec turns a Linear's weight and calibration statistics into the tensors an engine reads
(``weight``, ``weight_scale``, ``weight_scale_2``, ``input_scale``), turns those tensors back into a
dense weight, and fake-quantizes activations. It only calls the pure functions of
:mod:`quantport.formats` (weights through :mod:`quantport.kernels`, which runs those functions, or on
CUDA a kernel proven to return the same bytes), so what the simulated model computes is what is
exported, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from ..recipes import LinearScheme

__all__ = ["CODECS", "DynamicActivations", "SchemeCodec", "TensorSpec", "WeightOnly", "codec_for", "quantizes_stacks"]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """dtype and shape of one exported tensor, known before it is computed."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SchemeCodec(Protocol):
    """What the pipeline needs to know about one Linear scheme."""

    scheme: LinearScheme
    modelopt_algo: str | None
    """``quant_algo`` in the ModelOpt unified checkpoint; None when ModelOpt has no form for the numerics."""
    input_multiple: int
    """``in_features`` must be a multiple of this (1: no constraint)."""
    static_input_scale: bool
    """Activations use a static, calibrated per-tensor scale (calibration forward needed)."""
    shared_weight_amax: bool
    """Members of a shared-input group (q/k/v, gate/up) share the per-tensor weight amax."""
    group_size: int | None
    """Block size along the input dimension, written as ``group_size`` in the config."""

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[str, TensorSpec]:
        """Exported weight tensors (suffix -> spec), without ``input_scale``.

        ``dtype`` is the weight's dtype, for schemes whose scales are stored in it (compressed-tensors
        integer schemes); the others ignore it.
        """
        ...

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> dict[str, torch.Tensor]:
        """``weight`` [out, in] -> exported tensors keyed by suffix (``weight``, ``weight_scale``...).

        ``weight_amax`` is the fp32 0-d per-tensor amax (group-unified where the scheme shares it).
        """
        ...

    def dequantize_weight(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Exported tensors -> dense weight [out, in] in ``dtype``."""
        ...

    def input_scale(self, input_amax: torch.Tensor) -> torch.Tensor:
        """fp32 0-d ``input_scale`` from the calibrated activation amax (static schemes only)."""
        ...

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        """Activations as the engine sees them after quantization (identity for weight-only)."""
        ...


class DynamicActivations:
    """Mixin for codecs whose activations have no calibrated scale (dynamic or none)."""

    def input_scale(self, input_amax: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.scheme.value} has no static input_scale")  # type: ignore[attr-defined]


class WeightOnly(DynamicActivations):
    """Mixin for weight-only codecs: activations pass through unquantized."""

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        return x


CODECS: dict[LinearScheme, SchemeCodec] = {}


def register(codec: SchemeCodec) -> SchemeCodec:
    CODECS[codec.scheme] = codec
    return codec


def quantizes_stacks(codec: SchemeCodec) -> bool:
    """Whether ``codec.quantize_weight`` also takes a stack ``[E, out, in]`` with one weight amax per
    matrix ``[E]``, and returns every tensor with a leading ``E`` dim, each slice equal to what the
    matrix alone gives (codecs say so with a ``stacks = True`` class attribute; tested per codec)."""
    return bool(getattr(codec, "stacks", False))


def codec_for(scheme: LinearScheme) -> SchemeCodec:
    """The codec of ``scheme``."""
    return CODECS[scheme]


from . import fp8, integer, integer_modelopt, mxfp4, mxfp8, nvfp4, nvfp4_ct  # noqa: E402,F401  (registration)
