"""Numeric formats as frozen descriptors: what a format *is*, with no checkpoint vocabulary.

A :class:`NumericFormat` says how a Linear's numbers are quantized (element type, scale granularity and
dtype, block size, activation side) and what the pipeline must do for it (calibrate, share the weight
amax across fused siblings, accept ``[E, out, in]`` stacks). Where checkpoint dialects store the same
numbers differently, the descriptor names the :class:`ScaleConvention` it uses; tensor names,
``quant_algo`` strings and config blocks belong to the dialects in :mod:`quantport.export.targets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

__all__ = ["ActivationQuant", "Element", "NumericFormat", "ScaleConvention", "ScaleGranularity", "ScaleType"]


class Element(StrEnum):
    """The stored weight element."""

    FP8_E4M3 = "fp8_e4m3"
    """One byte per weight, float8_e4m3fn (max 448)."""
    E2M1 = "e2m1"
    """Four bits per weight (FP4: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and signs), two per byte."""
    INT8 = "int8"
    """One signed byte per weight."""
    INT4 = "int4"
    """Four signed bits per weight, packed (per dialect) into bytes or int32 words."""


class ScaleType(StrEnum):
    """How a weight scale is encoded."""

    FLOAT = "float"
    """A float multiplier (fp32, FP8 E4M3 or the model dtype)."""
    E8M0 = "e8m0"
    """A power of two stored as a biased exponent byte (``2 ** (byte - 127)``), OCP MX."""


class ScaleGranularity(StrEnum):
    """Which weights share one scale."""

    TENSOR = "tensor"
    """One scale for the whole matrix."""
    CHANNEL = "channel"
    """One scale per output row."""
    GROUP = "group"
    """One scale per ``block_size`` consecutive inputs of a row."""
    BLOCK_2D = "block_2d"
    """One scale per ``block_size x block_size`` tile."""


class ActivationQuant(StrEnum):
    """What happens to a quantized Linear's inputs."""

    STATIC = "static"
    """Quantized with a calibrated per-tensor scale (needs a calibration forward)."""
    DYNAMIC = "dynamic"
    """Quantized with scales computed at run time (per token or per block); no calibration."""
    NONE = "none"
    """Left in the model dtype (weight-only)."""


class ScaleConvention(StrEnum):
    """How a scale is derived and stored where checkpoint dialects differ; the numbers decoded differ in the
    last bit between conventions, so a model is quantized with the convention of its target dialect."""

    MULTIPLIER = "multiplier"
    """NVFP4 global scale ``amax / 2688`` in fp32; ``w = e2m1 * (block * global)`` (ModelOpt)."""
    DIVISOR = "divisor"
    """NVFP4 global scale ``2688 / amax`` in fp32; ``w = e2m1 * (block / global)`` (compressed-tensors)."""
    RESTRICTED_FP32 = "restricted_fp32"
    """Integer scale ``amax / (2**(bits-1) - 1)`` (``/7``, ``/127``) in fp32 (ModelOpt)."""
    HALF_STEP_MODEL_DTYPE = "half_step_model_dtype"
    """Integer scale ``amax / ((2**bits - 1) / 2)`` (``/7.5``, ``/127.5``) in the weight's dtype, asymmetric
    ``(max - min) / (2**bits - 1)`` with a zero point (compressed-tensors)."""


@dataclass(frozen=True, slots=True)
class NumericFormat:
    """A numeric format of a quantized Linear: weights, their scales and the activation side.

    Attributes:
        name: a label for messages (``"nvfp4"``, ``"int4-g128"``).
        element: the stored weight element.
        granularity: which weights share one scale.
        block_size: inputs per scale for :attr:`ScaleGranularity.GROUP`, the tile edge for
            :attr:`ScaleGranularity.BLOCK_2D`; None otherwise.
        scale_type: how the scale is encoded.
        scale_dtype: the stored scale's dtype; None: the weight's dtype.
        activations: what happens to the inputs.
        input_multiple: ``in_features`` must be a multiple of this (1: no constraint).
        shared_weight_amax: members of a shared-input group (q/k/v, gate/up) share the per-tensor weight amax
            (engines fuse them with one global scale).
        stacks: the codec quantizes a stack ``[E, out, in]`` with one weight amax per matrix ``[E]`` in one
            call, every slice equal to the matrix alone.
        convention: the scale convention, where dialects differ (None: every dialect stores it alike).
        symmetric: False when a zero point is stored beside the scale.
    """

    name: str
    element: Element
    granularity: ScaleGranularity
    block_size: int | None
    scale_type: ScaleType
    scale_dtype: torch.dtype | None
    activations: ActivationQuant
    input_multiple: int = 1
    shared_weight_amax: bool = False
    stacks: bool = False
    convention: ScaleConvention | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        blocked = self.granularity in (ScaleGranularity.GROUP, ScaleGranularity.BLOCK_2D)
        if blocked != (self.block_size is not None):
            raise ValueError(f"{self.name}: block_size is set exactly for group and 2-D block scales")
        if self.input_multiple < 1:
            raise ValueError(f"{self.name}: input_multiple must be >= 1, got {self.input_multiple}")

    @property
    def needs_calibration(self) -> bool:
        """Whether the inputs' amax must be calibrated (static activation scales)."""
        return self.activations is ActivationQuant.STATIC

    @property
    def group_size(self) -> int | None:
        """Inputs per scale along a row for group scales (the ``group_size`` configs write); None otherwise."""
        return self.block_size if self.granularity is ScaleGranularity.GROUP else None

    @property
    def global_scale(self) -> bool:
        """Whether a per-tensor fp32 global scale sits above FP8 group scales (NVFP4's two-level scales)."""
        return self.scale_dtype == torch.float8_e4m3fn
