"""FP8 E4M3 (``torch.float8_e4m3fn``) numerics, bit-identical to nvidia-modelopt 0.47's export.

Scales are fp32 and *divide* the weight: ``codes = fp8(w / scale)``, ``w ~= codes * scale``.

What modelopt's export computes (and these functions reproduce):

* ``scale = amax.float() / 448`` in fp32, after modelopt's export-time amax sanitising
  (``TensorQuantizer.export_amax``): a 0 or NaN amax becomes 448 (so the scale is 1.0), +inf becomes the
  largest finite value of the amax dtype, and the amax is clamped to at least ``finfo.tiny`` (2**-126).
* Per-tensor (``FP8``): ``w / scale`` with ``scale`` a 0-d fp32 tensor.  PyTorch's type promotion keeps
  the quotient in ``w.dtype`` (a 0-d operand does not promote), so for a bf16 weight the quotient is
  rounded to bf16 before the fp8 cast, exactly as in modelopt's ``to_quantized_weight``.
* Per-channel (``FP8_PER_CHANNEL_PER_TOKEN``) and 128x128 blocks (``FP8_PB_WO``): the scale is not 0-d,
  so the quotient is computed and kept in fp32 and then cast to fp8.
* The cast is round-to-nearest-even with fp8 subnormals.  Unlike modelopt we clamp the quotient to
  ``[-448, 448]`` first, so out-of-range values saturate instead of becoming NaN on PyTorch versions whose
  cast does not saturate (torch 2.13's cast saturates, so there the results agree), and a NaN quotient
  (NaN input, or ``0 / 0`` from a zero scale) becomes code 0: no function here ever writes a NaN code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels
from ..recipes import LinearScheme
from ..schemes.codec import DynamicActivations, FormatCapabilities, TensorSpec, WeightOnly
from ..schemes.registry import register
from .descriptors import ActivationQuant, Element, NumericFormat, ScaleGranularity, ScaleType
from .division import divide
from .pieces import Piece, QuantizedPieces

__all__ = [
    "block_amax_2d",
    "dequantize_fp8",
    "fake_quantize_fp8",
    "fake_quantize_fp8_per_token",
    "FP8_BLOCK",
    "fp8_block_scale_shape",
    "FP8_BLOCK_WEIGHTS",
    "FP8_E4M3_MAX",
    "FP8_PER_CHANNEL_DYNAMIC",
    "FP8_PER_TENSOR_STATIC",
    "fp8_scale_from_amax",
    "Fp8BlockCodec",
    "Fp8DynamicCodec",
    "Fp8TensorCodec",
    "quantize_fp8_block",
    "quantize_fp8_per_channel",
    "quantize_fp8_per_tensor",
]

FP8_E4M3_MAX: float = 448.0
FP8_BLOCK: tuple[int, int] = (128, 128)

FP8_PER_TENSOR_STATIC = NumericFormat(
    "fp8", Element.FP8_E4M3, ScaleGranularity.TENSOR, None, ScaleType.FLOAT, torch.float32,
    ActivationQuant.STATIC, stacks=True,
)  # fmt: skip
"""W8A8: one fp32 scale ``amax / 448`` per weight matrix and one calibrated per-tensor input scale."""
FP8_PER_CHANNEL_DYNAMIC = NumericFormat(
    "fp8-dynamic", Element.FP8_E4M3, ScaleGranularity.CHANNEL, None, ScaleType.FLOAT, torch.float32,
    ActivationQuant.DYNAMIC,
)  # fmt: skip
"""One fp32 scale per output channel; inputs quantized per token at run time."""
FP8_BLOCK_WEIGHTS = NumericFormat(
    "fp8-block", Element.FP8_E4M3, ScaleGranularity.BLOCK_2D, FP8_BLOCK[0], ScaleType.FLOAT, torch.float32,
    ActivationQuant.NONE, input_multiple=FP8_BLOCK[1],
)  # fmt: skip
"""One fp32 scale per 128x128 tile; activations unquantized."""

_FP8 = torch.float8_e4m3fn


def _check_float(x: Tensor, name: str) -> None:
    if not torch.is_floating_point(x) or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{name} must be a float32/bfloat16/float16 tensor, got {x.dtype}")


def _cast_fp8(q: Tensor) -> Tensor:
    """Saturating round-to-nearest-even cast of an already scaled tensor to float8_e4m3fn; NaN -> 0.

    ``q`` must be a temporary (every caller passes a fresh quotient): it is sanitised in place, which
    saves two full-size allocations per weight.
    """
    torch.nan_to_num_(q, nan=0.0)
    return q.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(_FP8)


def fp8_scale_from_amax(amax: Tensor) -> Tensor:
    """fp32 scale ``amax / 448`` of the same shape as ``amax`` (0-d, per-channel ``[out]`` or a block grid).

    Sanitised like modelopt's ``export_amax``: 0 or NaN -> 448 (scale 1.0), +inf -> dtype max,
    then clamped to ``[finfo.tiny, finfo.max]`` of the amax dtype.  The result is always finite and > 0.
    """
    amax = torch.as_tensor(amax).detach()
    if not torch.is_floating_point(amax) or amax.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        amax = amax.to(torch.float32)
    info = torch.finfo(amax.dtype)
    amax = torch.where(amax == 0, torch.full_like(amax, FP8_E4M3_MAX), amax)
    amax = torch.nan_to_num(amax, nan=FP8_E4M3_MAX).clamp(min=info.tiny, max=info.max)
    return divide(amax.to(torch.float32), FP8_E4M3_MAX)


def quantize_fp8_per_tensor(w: Tensor, scale: Tensor, *, in_range: bool = False) -> Tensor:
    """``w`` (any shape, float) with a one-element fp32 ``scale`` -> float8_e4m3fn codes of ``w.shape``.

    Mirrors modelopt: the quotient ``w / scale`` is taken with ``scale`` as a 0-d fp32 tensor, so it is
    rounded to ``w.dtype`` (e.g. bf16) before the fp8 cast.

    ``in_range=True`` is a promise that ``w`` is finite and ``scale >= max|w| / 448`` (true when the
    scale comes from ``w``'s own amax): every quotient is then a finite value the cast represents
    without saturation, and the NaN / saturation sanitising (two passes over ``w``) is skipped. The
    codes are the same either way.
    """
    _check_float(w, "w")
    scale = torch.as_tensor(scale, device=w.device)
    if scale.numel() != 1:
        raise ValueError(f"per-tensor scale must have one element, got shape {tuple(scale.shape)}")
    quotient = w / scale.to(torch.float32).reshape(())
    return quotient.to(_FP8) if in_range else _cast_fp8(quotient)


def quantize_fp8_per_channel(w: Tensor, scale: Tensor) -> Tensor:
    """``w [..., out, in]`` with fp32 ``scale [..., out]`` (one scale per row) -> float8_e4m3fn codes.

    The quotient is computed in fp32 (``scale`` broadcast along the last dim), as modelopt does.
    """
    _check_float(w, "w")
    scale = torch.as_tensor(scale, device=w.device).to(torch.float32)
    lead = tuple(w.shape[:-1])
    if w.dim() < 1 or tuple(scale.shape) not in (lead, (*lead, 1)):
        raise ValueError(f"per-channel scale must have shape w.shape[:-1]={lead}, got {tuple(scale.shape)}")
    return _cast_fp8(w / scale.reshape(*lead, 1))


def fp8_block_scale_shape(
    out_features: int, in_features: int, block: tuple[int, int] = FP8_BLOCK
) -> tuple[int, int, int, int]:
    """On-disk shape of modelopt's FP8_PB_WO ``weight_scale``: ``(ceil(out/bo), 1, ceil(in/bi), 1)``."""
    return (math.ceil(out_features / block[0]), 1, math.ceil(in_features / block[1]), 1)


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    if len(block) != 2 or any(int(b) <= 0 for b in block):
        raise ValueError(f"block must be two positive ints, got {block}")
    return int(block[0]), int(block[1])


def block_amax_2d(w: Tensor, block: tuple[int, int] = FP8_BLOCK) -> Tensor:
    """Per-block ``max|w|`` of ``w [out, in]`` in ``w.dtype``, shape ``(ceil(out/bo), 1, ceil(in/bi), 1)``.

    A partial last block is zero-padded (as modelopt does), which does not change its amax.
    """
    _check_float(w, "w")
    if w.dim() != 2:
        raise ValueError(f"block quantization needs a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    bo, bi = _check_block(block)
    out_f, in_f = w.shape
    ob, _, ib, _ = fp8_block_scale_shape(out_f, in_f, (bo, bi))
    padded = torch.nn.functional.pad(w.detach().abs(), (0, ib * bi - in_f, 0, ob * bo - out_f))
    return padded.reshape(ob, bo, ib, bi).amax(dim=(1, 3), keepdim=True)


def _expand_block_scale(scale: Tensor, shape: torch.Size, block: tuple[int, int]) -> Tensor:
    """Expand a block scale ``[ob,1,ib,1]`` or ``[ob,ib]`` to an fp32 tensor of ``shape = (out, in)``."""
    bo, bi = _check_block(block)
    out_f, in_f = shape
    ob, _, ib, _ = fp8_block_scale_shape(out_f, in_f, (bo, bi))
    if scale.numel() != ob * ib or (scale.dim() not in (2, 4)):
        raise ValueError(
            f"block scale for a [{out_f}, {in_f}] weight with block {block} must have shape "
            f"({ob}, 1, {ib}, 1) or ({ob}, {ib}), got {tuple(scale.shape)}"
        )
    grid = scale.to(torch.float32).reshape(ob, ib)
    return grid.repeat_interleave(bo, dim=0).repeat_interleave(bi, dim=1)[:out_f, :in_f]


def quantize_fp8_block(w: Tensor, block: tuple[int, int] = FP8_BLOCK) -> tuple[Tensor, Tensor]:
    """``w [out, in]`` -> (fp8 codes ``[out, in]``, fp32 scale ``[ceil(out/bo), 1, ceil(in/bi), 1]``).

    Same as modelopt's FP8_PB_WO export (``FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG``): scale = block amax / 448
    (sanitised), quotient in fp32; partial blocks on either dimension are zero-padded, never rejected.
    """
    scale = fp8_scale_from_amax(block_amax_2d(w, block))
    codes = _cast_fp8(w / _expand_block_scale(scale, w.shape, block))
    return codes, scale


def _scale_layout(shape: torch.Size, scale: Tensor, block: tuple[int, int]) -> str:
    """Classify ``scale`` against a tensor of ``shape``: "tensor", "channel" or "block"."""
    if scale.numel() == 1:
        return "tensor"
    lead = tuple(shape[:-1])
    if tuple(scale.shape) in (lead, (*lead, 1)):
        return "channel"
    if len(shape) == 2 and scale.dim() in (2, 4):
        return "block"
    raise ValueError(f"cannot match scale of shape {tuple(scale.shape)} to a tensor of shape {tuple(shape)}")


def dequantize_fp8(
    codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16, block: tuple[int, int] = FP8_BLOCK
) -> Tensor:
    """float8_e4m3fn ``codes`` times fp32 ``scale`` -> ``dtype`` tensor of ``codes.shape``.

    ``scale`` is one element (per-tensor), ``codes.shape[:-1]`` (per-channel / per-token), or a block grid
    ``[ceil(out/bo), 1, ceil(in/bi), 1]`` / ``[ceil(out/bo), ceil(in/bi)]`` for 2-D codes.  The product is
    formed in fp32 and rounded once to ``dtype``.
    """
    if codes.dtype != _FP8:
        raise TypeError(f"codes must be torch.float8_e4m3fn, got {codes.dtype}")
    scale = torch.as_tensor(scale, device=codes.device)
    layout = _scale_layout(codes.shape, scale, block)
    values = codes.to(torch.float32)
    if layout == "tensor":
        out = values * scale.to(torch.float32).reshape(())
    elif layout == "channel":
        out = values * scale.to(torch.float32).reshape(*codes.shape[:-1], 1)
    else:
        out = values * _expand_block_scale(scale, codes.shape, block)
    return out.to(dtype)


def fake_quantize_fp8(x: Tensor, scale: Tensor, block: tuple[int, int] = FP8_BLOCK) -> Tensor:
    """``dequantize_fp8(quantize(x, scale), scale)`` in ``x.dtype``.

    ``scale``: one element (per-tensor), ``x.shape[:-1]`` (per-row) or a block grid for 2-D ``x``.
    """
    _check_float(x, "x")
    if scale is None:
        raise ValueError("fake_quantize_fp8 needs a scale (use fake_quantize_fp8_per_token for dynamic)")
    scale = torch.as_tensor(scale, device=x.device)
    layout = _scale_layout(x.shape, scale, block)
    if layout == "tensor":
        codes = quantize_fp8_per_tensor(x, scale)
    elif layout == "channel":
        codes = quantize_fp8_per_channel(x, scale)
    else:
        codes = _cast_fp8(x / _expand_block_scale(scale, x.shape, block))
    return dequantize_fp8(codes, scale, x.dtype, block)


def fake_quantize_fp8_per_token(x: Tensor) -> Tensor:
    """Dynamic per-token FP8: scale = (row amax over the last dim) / 448, rows of zeros get scale 1.0.

    ``x [..., hidden]`` -> same shape and dtype.
    """
    _check_float(x, "x")
    scale = fp8_scale_from_amax(x.detach().abs().amax(dim=-1))
    return dequantize_fp8(quantize_fp8_per_channel(x, scale), scale, x.dtype)


# --------------------------------------------------------------------------------------------
# codecs: FP8 Linear schemes: per-tensor W8A8, per-channel weights with dynamic tokens, 128x128 blocks
# --------------------------------------------------------------------------------------------

_F32 = torch.float32


@dataclass(frozen=True)
class Fp8TensorCodec(FormatCapabilities):
    """W8A8 FP8, static per-tensor scales (engines requantize fused shards to the max weight scale)."""

    scheme: LinearScheme = LinearScheme.FP8
    format: NumericFormat = FP8_PER_TENSOR_STATIC

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        return {Piece.CODES: TensorSpec(_FP8, (out_features, in_features)), Piece.SCALE: TensorSpec(_F32, ())}

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        scale = fp8_scale_from_amax(weight_amax)
        # weight_amax is the weight's own (or a larger shared) amax of finite weights: in range.
        return QuantizedPieces(kernels.quantize_fp8_per_tensor(weight, scale, in_range=True), scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(pieces[Piece.CODES], pieces[Piece.SCALE], dtype)

    def input_scale(self, input_amax: torch.Tensor) -> torch.Tensor:
        return fp8_scale_from_amax(input_amax)

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        return fake_quantize_fp8(x, input_scale)


@dataclass(frozen=True)
class Fp8DynamicCodec(DynamicActivations):
    """FP8 weights with one scale per output channel, dynamic per-token FP8 activations."""

    scheme: LinearScheme = LinearScheme.FP8_DYNAMIC
    format: NumericFormat = FP8_PER_CHANNEL_DYNAMIC

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        return {
            Piece.CODES: TensorSpec(_FP8, (out_features, in_features)),
            Piece.SCALE: TensorSpec(_F32, (out_features,)),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        channel_amax = weight.abs().amax(dim=1).float()
        scale = fp8_scale_from_amax(channel_amax)
        return QuantizedPieces(quantize_fp8_per_channel(weight, scale), scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(pieces[Piece.CODES], pieces[Piece.SCALE], dtype)

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        return fake_quantize_fp8_per_token(x)


@dataclass(frozen=True)
class Fp8BlockCodec(WeightOnly):
    """FP8 weights with one scale per 128x128 block, activations unquantized."""

    scheme: LinearScheme = LinearScheme.FP8_BLOCK
    format: NumericFormat = FP8_BLOCK_WEIGHTS

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        return {
            Piece.CODES: TensorSpec(_FP8, (out_features, in_features)),
            Piece.SCALE: TensorSpec(_F32, fp8_block_scale_shape(out_features, in_features)),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        codes, scale = quantize_fp8_block(weight)
        return QuantizedPieces(codes, scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(pieces[Piece.CODES], pieces[Piece.SCALE], dtype)


register(Fp8TensorCodec())
register(Fp8DynamicCodec())
register(Fp8BlockCodec())
