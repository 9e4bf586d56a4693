"""Integer weight/activation formats: INT8 per-channel, INT4 group-wise, and the two INT4 packings.

Arithmetic that matches nvidia-modelopt 0.47's export path bit for bit:

* INT8 weight (``W8A8_SQ`` / ``W8A16``): ``scale = amax.float() / 127`` (fp32 ``[out]``) and
  ``codes = clamp(round(w / scale[:, None]), -128, 127)``. The division is done in fp32 because a
  bf16 weight is promoted by the fp32 scale. ``round`` is round-half-to-even.
* INT4 AWQ (``W4A16_AWQ``): ``scale = block_amax.float() / 7`` (fp32 ``[out, in/128]``) and
  ``codes = clamp(round(w / scale), -8, 7)``. The export packs these along the **output** dim:
  rows ``2k`` and ``2k+1`` share a byte, with row ``2k`` in the low nibble. Nibbles are two's
  complement. The layout is ``uint8 [out/2, in]``, from ``pack_int4_in_uint8``.
* Scale sanitizing as in ``TensorQuantizer.export_amax``: an amax of 0 or NaN becomes ``maxbound``
  (so the scale is 1.0), and amax is clamped to ``[finfo.tiny, finfo.max]`` of its dtype.
* Dynamic per-token INT8 fake quant, from modelopt's CPU ``_tensor_quant``:
  ``s = 127 / amax`` (fp32), ``out = clamp(round(x * s), -128 | -127, 127) / s``. When
  ``amax <= 2**-24`` the output is zero.

Arithmetic that matches compressed-tensors 0.20 (``pack-quantized`` format):

* ``pack_to_int32``: offset binary (``code + 8``), 8 codes per int32 along the packed dim, with
  element ``i`` at bits ``4i..4i+3``. The tail is padded with raw zero nibbles, and the words are
  reinterpreted as signed int32.
* ``calculate_qparams``: symmetric ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)``, which is
  ``amax / 7.5`` for 4-bit, unlike modelopt's ``/ 7``. Asymmetric ``scale = (max - min) / (qmax - qmin)``
  and ``zp = round(clamp(qmin - min / scale, qmin, qmax))``. Both are computed in the weight dtype,
  and a scale of 0 is replaced by ``finfo(dtype).eps``.
* 8-bit ``pack_to_int32``: ``code + 128``, 4 codes per int32, element ``i`` at bits ``8i..8i+7``.
* quantize ``clamp(round(x / s + zp), qmin, qmax)`` and dequantize ``(q - zp) * s``, both in the
  scale/weight dtype.

All functions are pure and accept leading batch dims (e.g. MoE ``[E, out, in]``).
"""

from __future__ import annotations

import torch

from .descriptors import (
    ActivationQuant,
    Element,
    NumericFormat,
    ScaleConvention,
    ScaleGranularity,
    ScaleType,
)
from .division import divide
from .int_packing import (
    pack_int4_ct,
    pack_int4_modelopt,
    pack_int_ct,
    unpack_int4_ct,
    unpack_int4_modelopt,
    unpack_int_ct,
)

__all__ = [
    "INT4_GROUP",
    "INT4_G128_WEIGHTS",
    "INT8_G128_WEIGHTS",
    "INT8_PER_CHANNEL_DYNAMIC",
    "INT8_PER_CHANNEL_WEIGHTS",
    "int8_scale_from_amax",
    "quantize_int8",
    "dequantize_int8",
    "fake_quantize_int8_per_token",
    "int4_scale_from_amax",
    "int_weight_scale",
    "int4_group_scales",
    "quantize_int4",
    "dequantize_int4",
    "pack_int4_modelopt",
    "unpack_int4_modelopt",
    "pack_int4_ct",
    "unpack_int4_ct",
    "pack_int_ct",
    "unpack_int_ct",
    "int_group_qparams",
    "quantize_int_group_ct",
    "dequantize_int_group_ct",
]

INT4_GROUP = 128
"""Default INT4 group size along the input dim."""

_INT8_MAXBOUND = 127

INT8_PER_CHANNEL_DYNAMIC = NumericFormat(
    "int8", Element.INT8, ScaleGranularity.CHANNEL, None, ScaleType.FLOAT, None, ActivationQuant.DYNAMIC,
    convention=ScaleConvention.HALF_STEP_MODEL_DTYPE,
)  # fmt: skip
"""W8A8: one scale ``amax / 127.5`` per output channel in the weight dtype, inputs per token at run time."""
INT8_PER_CHANNEL_WEIGHTS = NumericFormat(
    "int8-channel", Element.INT8, ScaleGranularity.CHANNEL, None, ScaleType.FLOAT, torch.float32,
    ActivationQuant.NONE, stacks=True, convention=ScaleConvention.RESTRICTED_FP32,
)  # fmt: skip
"""Weight-only INT8, one fp32 scale ``amax / 127`` per output channel."""
INT4_G128_WEIGHTS = NumericFormat(
    "int4-g128", Element.INT4, ScaleGranularity.GROUP, INT4_GROUP, ScaleType.FLOAT, None, ActivationQuant.NONE,
    input_multiple=INT4_GROUP, convention=ScaleConvention.HALF_STEP_MODEL_DTYPE,
)  # fmt: skip
"""Weight-only INT4, one scale ``amax / 7.5`` per 128 inputs in the weight dtype (``symmetric=False``:
``(max - min) / 15`` and a zero point); ModelOpt's form is ``replace`` with ``RESTRICTED_FP32``."""
INT8_G128_WEIGHTS = NumericFormat(
    "int8-g128", Element.INT8, ScaleGranularity.GROUP, INT4_GROUP, ScaleType.FLOAT, None, ActivationQuant.NONE,
    input_multiple=INT4_GROUP, convention=ScaleConvention.HALF_STEP_MODEL_DTYPE,
)  # fmt: skip
"""Weight-only INT8, one scale ``amax / 127.5`` per 128 inputs in the weight dtype."""
_INT4_MAXBOUND = 7


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _sanitize_amax(amax: torch.Tensor, maxbound: int) -> torch.Tensor:
    """modelopt ``export_amax``: zero/NaN -> maxbound, then clamp to [tiny, max] of amax's dtype."""
    if not torch.is_floating_point(amax):
        raise TypeError(f"amax must be a floating tensor, got {amax.dtype}")
    if bool((amax < 0).any()):
        raise ValueError("amax must be non-negative")
    sanitized = torch.nan_to_num(torch.where(amax == 0, torch.full_like(amax, maxbound), amax), nan=maxbound)
    finfo = torch.finfo(sanitized.dtype)
    return sanitized.clamp(min=finfo.tiny, max=finfo.max)


def _num_groups(w: torch.Tensor, group: int, name: str) -> int:
    if w.dim() < 1:
        raise ValueError(f"{name}: expected at least a 1-d tensor, got a 0-d tensor")
    if not isinstance(group, int) or group <= 0:
        raise ValueError(f"{name}: group size must be a positive int, got {group!r}")
    n = w.shape[-1]
    if n % group != 0:
        raise ValueError(f"{name}: last dimension ({n}) must be divisible by the group size {group}")
    return n // group


def _check_group_scale(scale: torch.Tensor, w: torch.Tensor, ngroups: int, name: str) -> None:
    expected = (*w.shape[:-1], ngroups)
    if tuple(scale.shape) != expected:
        raise ValueError(f"{name}: scale has shape {tuple(scale.shape)}, expected {expected}")


# --------------------------------------------------------------------------------------------
# INT8 per-channel (weights) and per-token (activations)
# --------------------------------------------------------------------------------------------


def int8_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Per-channel INT8 scale ``amax / 127`` (fp32, same shape as ``amax``, e.g. ``[out]``).

    Sanitized as in modelopt's export: an amax of 0 or NaN gives scale 1.0.
    """
    return divide(_sanitize_amax(amax, _INT8_MAXBOUND).float(), _INT8_MAXBOUND)


def quantize_int8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize ``w [..., out, in]`` with per-channel ``scale [..., out]`` to ``int8 [..., out, in]``.

    ``clamp(round_half_even(w / scale[..., None]), -128, 127)``.
    """
    if w.dim() < 1 or tuple(scale.shape) != tuple(w.shape[:-1]):
        raise ValueError(
            f"quantize_int8: scale shape {tuple(scale.shape)} must equal w.shape[:-1] {tuple(w.shape[:-1])}"
        )
    return (w / scale[..., None]).round().clamp(-128, 127).to(torch.int8)


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize ``int8 [..., out, in]`` with ``scale [..., out]``: ``codes.to(dtype) * scale.to(dtype)``.

    As modelopt's ``from_quantized_weight`` does, the product is computed in ``dtype``.
    """
    if codes.dtype != torch.int8:
        raise TypeError(f"dequantize_int8: codes must be torch.int8, got {codes.dtype}")
    if codes.dim() < 1 or tuple(scale.shape) != tuple(codes.shape[:-1]):
        raise ValueError(
            f"dequantize_int8: scale shape {tuple(scale.shape)} must equal codes.shape[:-1] {tuple(codes.shape[:-1])}"
        )
    return codes.to(dtype) * scale[..., None].to(dtype)


def fake_quantize_int8_per_token(x: torch.Tensor, *, narrow_range: bool = False) -> torch.Tensor:
    """Dynamic symmetric INT8 quantize-dequantize with one scale per row of the last dim.

    Same shape and dtype as ``x``. The arithmetic is modelopt's CPU fake quant in fp32. Codes are
    clamped to ``[-128, 127]``, or to ``[-127, 127]`` if ``narrow_range`` (the modelopt default
    is False). Rows with ``amax <= 2**-24`` come out as zeros.
    """
    if x.dim() < 1:
        raise ValueError("fake_quantize_int8_per_token: expected at least a 1-d tensor")
    amax = torch.maximum(x.amax(dim=-1, keepdim=True).abs(), x.amin(dim=-1, keepdim=True).abs())
    xf = x.float()
    amaxf = amax.float()
    max_bound = torch.tensor(float(_INT8_MAXBOUND), device=x.device)
    min_bound = -max_bound if narrow_range else -max_bound - 1
    scale = max_bound / amaxf
    tiny = amaxf <= 1.0 / (1 << 24)
    scale = torch.where(tiny, torch.zeros_like(scale), scale)
    out = torch.clamp((xf * scale).round(), min_bound, max_bound)
    out = out / torch.where(tiny, torch.ones_like(scale), scale)
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------
# INT4 group-wise (modelopt AWQ)
# --------------------------------------------------------------------------------------------


def int4_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """INT4 scale ``amax / 7`` (fp32, same shape as ``amax``), sanitized as in modelopt's export."""
    return divide(_sanitize_amax(amax, _INT4_MAXBOUND).float(), _INT4_MAXBOUND)


def int_weight_scale(amax: torch.Tensor, bits: int, convention: ScaleConvention) -> torch.Tensor:
    """Symmetric ``bits``-bit weight scale from ``amax`` (same shape) in a dialect's convention.

    RESTRICTED_FP32 (ModelOpt): fp32 ``amax / (2**(bits-1) - 1)``, sanitized as :func:`int8_scale_from_amax`.
    HALF_STEP_MODEL_DTYPE (compressed-tensors): ``amax / ((2**bits - 1) / 2)`` in amax's dtype (pass the
    weight's), a scale of 0 becomes ``finfo.eps``, as :func:`int_group_qparams` computes it.
    """
    if bits not in (4, 8):
        raise ValueError(f"int_weight_scale: bits must be 4 or 8, got {bits}")
    if convention is ScaleConvention.RESTRICTED_FP32:
        maxbound = 2 ** (bits - 1) - 1
        return divide(_sanitize_amax(amax, maxbound).float(), maxbound)
    if convention is ScaleConvention.HALF_STEP_MODEL_DTYPE:
        scale = amax / (torch.tensor(2.0**bits - 1, device=amax.device).to(amax.dtype) / 2)
        return torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), scale)
    raise ValueError(f"integer scales are RESTRICTED_FP32 or HALF_STEP_MODEL_DTYPE, got {convention!r}")


def int4_group_scales(w: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """Give the modelopt INT4 scales of ``w [..., out, in]``: ``block_amax / 7``.

    Returns fp32 ``[..., out, in/group]``, sanitized as in :func:`int4_scale_from_amax`.
    """
    ngroups = _num_groups(w, group, "int4_group_scales")
    amax = w.unflatten(-1, (ngroups, group)).abs().amax(dim=-1)
    return int4_scale_from_amax(amax)


def quantize_int4(w: torch.Tensor, scale: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """Quantize ``w [..., out, in]`` with ``scale [..., out, in/group]`` to ``int8`` codes in [-8, 7].

    ``clamp(round_half_even(w / scale), -8, 7)``, computed in the promoted dtype (fp32 for fp32 scales).
    """
    ngroups = _num_groups(w, group, "quantize_int4")
    _check_group_scale(scale, w, ngroups, "quantize_int4")
    q = (w.unflatten(-1, (ngroups, group)) / scale[..., None]).round().clamp(-8, 7)
    return q.to(torch.int8).flatten(-2)


def dequantize_int4(
    codes: torch.Tensor,
    scale: torch.Tensor,
    group: int = INT4_GROUP,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize INT4 ``codes [..., out, in]`` with ``scale [..., out, in/group]`` to ``dtype``.

    Computes ``codes * scale`` in fp32 and rounds once to ``dtype``. modelopt has no export-side
    counterpart for this.
    """
    ngroups = _num_groups(codes, group, "dequantize_int4")
    _check_group_scale(scale, codes, ngroups, "dequantize_int4")
    out = codes.float().unflatten(-1, (ngroups, group)) * scale.float()[..., None]
    return out.flatten(-2).to(dtype)


# --------------------------------------------------------------------------------------------
# compressed-tensors: qparams, quantize / dequantize (packing: int_packing.py)
# --------------------------------------------------------------------------------------------


def _ct_range(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
    bit_range = 2.0**bits
    q_max = torch.tensor(bit_range / 2 - 1, device=device)
    q_min = torch.tensor(-bit_range / 2, device=device)
    return q_min, q_max


def int_group_qparams(
    w: torch.Tensor, bits: int = 4, group: int = INT4_GROUP, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute compressed-tensors group qparams of ``w [..., out, in]`` from the exact per-group min/max.

    Returns ``(scale [..., out, in/group] in w's dtype, zero_point int8 [..., out, in/group])``,
    following ``calculate_qparams``. Symmetric: ``amax / ((2**bits - 1) / 2)`` with zero
    points 0. Asymmetric: ``(max - min) / (2**bits - 1)`` with
    ``zp = round(clamp(qmin - min/scale, qmin, qmax))``. A scale of 0 becomes ``finfo.eps``. For an
    asymmetric group that is all zero, compressed-tensors computes ``zp`` from ``0/0``. That is
    mirrored here, and the zero point it gives is platform-defined.
    """
    ngroups = _num_groups(w, group, "int_group_qparams")
    if not torch.is_floating_point(w):
        raise TypeError(f"int_group_qparams: w must be floating point, got {w.dtype}")
    q_min, q_max = _ct_range(bits, w.device)
    blocks = w.unflatten(-1, (ngroups, group))
    min_vals = blocks.amin(dim=-1)
    max_vals = blocks.amax(dim=-1)
    min_vals = torch.min(min_vals, torch.zeros_like(min_vals))
    max_vals = torch.max(max_vals, torch.zeros_like(max_vals))
    bit_range = q_max - q_min
    if symmetric:
        max_val_pos = torch.max(torch.abs(min_vals), torch.abs(max_vals))
        scales = max_val_pos / (bit_range.to(max_val_pos.dtype) / 2)
        zero_points = torch.zeros(scales.shape, device=w.device, dtype=min_vals.dtype)
    else:
        scales = (max_vals - min_vals) / bit_range.to(max_vals.dtype)
        zero_points = torch.clamp(q_min - (min_vals / scales), q_min, q_max)
    eps = torch.finfo(scales.dtype).eps
    scales = torch.where(scales == 0, torch.tensor(eps, dtype=scales.dtype, device=w.device), scales)
    info = torch.iinfo(torch.int8)
    zero_points = torch.round(torch.clamp(zero_points, info.min, info.max)).to(torch.int8)
    return scales, zero_points


def quantize_int_group_ct(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    *,
    bits: int = 4,
    group: int = INT4_GROUP,
) -> torch.Tensor:
    """Quantize ``w [..., out, in]`` group-wise as compressed-tensors' ``quantize(..., dtype=int8)`` does.

    ``clamp(round_half_even(w / scale + zp), qmin, qmax)``, computed in the promoted dtype of w and
    scale (bf16 for bf16 w and bf16 scale). Returns ``int8 [..., out, in]``.
    """
    ngroups = _num_groups(w, group, "quantize_int_group_ct")
    _check_group_scale(scale, w, ngroups, "quantize_int_group_ct")
    q_min, q_max = _ct_range(bits, w.device)
    x = w.unflatten(-1, (ngroups, group))
    scaled = x / scale.unsqueeze(-1)
    if zero_point is not None:
        _check_group_scale(zero_point, w, ngroups, "quantize_int_group_ct (zero_point)")
        scaled = scaled + zero_point.unsqueeze(-1).to(x.dtype)
    rounded = torch.round(torch.clamp(scaled, q_min, q_max))
    return rounded.to(torch.int8).flatten(-2)


def dequantize_int_group_ct(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    *,
    group: int = INT4_GROUP,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dequantize group-wise codes as compressed-tensors' ``dequantize`` does: ``(q - zp) * scale``.

    The computation is in ``scale.dtype``, and the result is cast to ``dtype`` (default
    ``scale.dtype``). Returns ``[..., out, in]``.
    """
    ngroups = _num_groups(codes, group, "dequantize_int_group_ct")
    _check_group_scale(scale, codes, ngroups, "dequantize_int_group_ct")
    out = codes.unflatten(-1, (ngroups, group)).to(scale.dtype)
    if zero_point is not None:
        _check_group_scale(zero_point, codes, ngroups, "dequantize_int_group_ct (zero_point)")
        out = out - zero_point.unsqueeze(-1).to(scale.dtype)
    out = out * scale.unsqueeze(-1)
    return out.flatten(-2).to(dtype if dtype is not None else scale.dtype)
