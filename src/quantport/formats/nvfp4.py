"""NVFP4 numerics (E2M1 codes, FP8 E4M3 scale per 16 inputs, fp32 global scale), bit-identical to
nvidia-modelopt 0.47's export (``NVFP4QTensor`` as driven by ``unified_export_hf``).

Layout: ``w ~= e2m1(code) * float(block_scale) * global_scale``; ``global_scale`` (modelopt's
``weight_scale_2`` / ``input_scale``) = amax / (6 * 448); codes are packed two per byte along the last
dim, the LOW nibble holding the EVEN column.  4-bit code = sign << 3 | magnitude index into
(0, 0.5, 1, 1.5, 2, 3, 4, 6).

Arithmetic matched (all fp32):

* block amax = max|w| over 16 consecutive inputs, in ``w.dtype`` then converted to fp32 (exact);
* ``block_scale = block_amax / (6 * global_scale)`` (the product ``6 * global_scale`` rounded to fp32
  first); a result of exactly 0 becomes 1.0; then clamp to ``[2**-9, 448]`` and round-to-nearest-even
  cast to float8_e4m3fn (fp8 subnormals are kept, 2**-9 is the smallest);
* ``scaled = w / (float(block_scale) * global_scale)`` with the fp32 product rounded first and the
  division done in fp32;
* E2M1 rounding is round-half-to-even on the magnitude (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
  2.5 -> 2, 3.5 -> 4, 5 -> 4), |x| > 5 saturates to 6, the sign bit is ``x < 0`` (so -0.0 -> code 0 and a
  negative value that rounds to zero -> code 8).

The scale convention (:class:`~quantport.formats.descriptors.ScaleConvention`) is a parameter:
``MULTIPLIER`` (the default, above) is ModelOpt's; ``DIVISOR`` is compressed-tensors' 0.20
(``generate_gparam`` / ``calculate_qparams`` / ``quantize`` / ``dequantize``), all fp32:

* ``global = 2688 / max(amax, finfo.tiny)``; a NaN or infinite result becomes 1.0;
* ``block_scale = fp8(clamp(global * (block_amax / 6), -448, 448))`` per 16 inputs, and a block scale of
  exactly 0 becomes 0.125 (compressed-tensors' epsilon for FP8 scales);
* ``codes = e2m1(clamp(w / (float(block_scale) / global), -6, 6))``, same rounding and packing;
* ``w ~= e2m1 * (float(block_scale) / global)``, rounded once to the model dtype.

Rounding ``1 / weight_scale_2`` would change decoded weights in the last bit, so the convention is chosen
before quantizing, never converted afterwards.

Deviations from modelopt (only where modelopt produces NaN): an all-zero tensor has amax 0, for which
modelopt writes ``weight_scale_2 = 0`` and NaN block scales; :func:`nvfp4_global_scale` instead replaces
a 0 / NaN amax by 6 (modelopt's own rule for exported activation amaxes), giving ``1/448``, block scale
1.0 and zero codes.  A NaN block scale (e.g. ``global_scale == 0``) is replaced by 1.0, and NaN in
:func:`cast_to_e2m1_codes` gives code 0 (modelopt gives 7, i.e. +6).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .. import kernels
from ..recipes import LinearScheme
from ..schemes.codec import FormatCapabilities, TensorSpec
from ..schemes.registry import register
from .descriptors import ActivationQuant, Element, NumericFormat, ScaleConvention, ScaleGranularity, ScaleType
from .division import divide
from .pieces import Piece, QuantizedPieces

__all__ = [
    "cast_to_e2m1_codes",
    "dequantize_nvfp4",
    "e2m1_codes_to_float",
    "E2M1_MAX",
    "E2M1_VALUES",
    "fake_quantize_nvfp4",
    "NVFP4",
    "NVFP4_BLOCK",
    "nvfp4_block_scales",
    "NVFP4_DIVISOR",
    "NVFP4_GLOBAL_DIVISOR",
    "nvfp4_global_scale",
    "Nvfp4Codec",
    "Nvfp4CtCodec",
    "pack_fp4",
    "quantize_nvfp4",
    "unpack_fp4",
]

E2M1_VALUES: tuple[float, ...] = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip
E2M1_MAX: float = 6.0
NVFP4_BLOCK: int = 16
_FP8_MAX: float = 448.0
NVFP4_GLOBAL_DIVISOR: float = E2M1_MAX * _FP8_MAX  # 2688
_BLOCK_SCALE_MIN: float = 2.0**-9  # smallest fp8 e4m3 subnormal
_DIVISOR_SCALE_EPS: float = 0.125  # compressed-tensors' replacement for an FP8 block scale of 0
_MULTIPLIER = ScaleConvention.MULTIPLIER

NVFP4 = NumericFormat(
    "nvfp4", Element.E2M1, ScaleGranularity.GROUP, NVFP4_BLOCK, ScaleType.FLOAT, torch.float8_e4m3fn,
    ActivationQuant.STATIC, input_multiple=NVFP4_BLOCK, shared_weight_amax=True, stacks=True,
    convention=ScaleConvention.MULTIPLIER,
)  # fmt: skip
"""W4A4 NVFP4 with ModelOpt's global scale; weight-only and compressed-tensors' convention are
``dataclasses.replace`` of it (engines fuse q/k/v and gate/up with one global scale: shared weight amax)."""

# Rounding thresholds on |x|: at the first kind a tie rounds down, at the second it rounds up,
# which is round-half-to-even for the E2M1 grid.
_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIE_UP = (0.75, 1.75, 3.5)


def _check_last_dim(x: Tensor, name: str) -> int:
    if x.dim() < 1 or x.shape[-1] % NVFP4_BLOCK != 0:
        raise ValueError(
            f"NVFP4 needs the last dim of {name} to be a multiple of {NVFP4_BLOCK}, got shape {tuple(x.shape)}"
        )
    return x.shape[-1] // NVFP4_BLOCK


def _check_float(x: Tensor, name: str) -> None:
    if not torch.is_floating_point(x) or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{name} must be a float32/bfloat16/float16 tensor, got {x.dtype}")


def _global_for(shape: torch.Size, global_scale: Tensor | float, device: torch.device) -> Tensor:
    """fp32 global scale broadcastable against a block grid ``[..., n_blocks]`` of a tensor of ``shape``.

    One element -> 0-d; otherwise one scale per leading matrix (``shape[:-2]``, e.g. per expert).
    """
    if global_scale is None:
        raise ValueError("NVFP4 needs a global scale (see nvfp4_global_scale)")
    g = torch.as_tensor(global_scale, device=device).to(torch.float32)
    if g.numel() == 1:
        return g.reshape(())
    lead = tuple(shape[:-2])
    if len(shape) < 2 or tuple(g.shape) not in (lead, (*lead, 1), (*lead, 1, 1)):
        raise ValueError(
            f"global scale must have one element or shape {lead} for a tensor of shape {tuple(shape)}, "
            f"got {tuple(g.shape)}"
        )
    return g.reshape(*lead, 1, 1)


def nvfp4_global_scale(amax: Tensor | float, convention: ScaleConvention = _MULTIPLIER) -> Tensor:
    """fp32 ``amax / (6 * 448)`` (same shape as ``amax``), always finite and > 0.

    0 / NaN amax -> 6 (so the scale is 1/448), +inf -> dtype max, clamped to >= ``finfo.tiny``; this is
    modelopt's export-time sanitising of amax (it leaves a zero *weight* amax as is, giving NaN scales).
    ``convention`` DIVISOR: fp32 ``2688 / max(amax, tiny)``, a NaN / inf result (amax 0 or NaN) -> 1.0.
    """
    if convention is ScaleConvention.DIVISOR:
        a = torch.clamp(torch.as_tensor(amax).detach().float(), min=torch.finfo(torch.float32).tiny)
        return torch.nan_to_num(NVFP4_GLOBAL_DIVISOR / a, nan=1.0, posinf=1.0, neginf=1.0)
    _check_convention(convention)
    amax = torch.as_tensor(amax).detach()
    if not torch.is_floating_point(amax) or amax.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        amax = amax.to(torch.float32)
    info = torch.finfo(amax.dtype)
    amax = torch.where(amax == 0, torch.full_like(amax, E2M1_MAX), amax)
    amax = torch.nan_to_num(amax, nan=E2M1_MAX).clamp(min=info.tiny, max=info.max)
    return divide(amax.to(torch.float32), NVFP4_GLOBAL_DIVISOR)


def cast_to_e2m1_codes(x: Tensor) -> Tensor:
    """Round already-scaled values to E2M1: float tensor -> uint8 codes 0..15 of the same shape.

    Round-half-to-even on |x|, saturating at 6 (+-inf -> +-6), sign bit from ``x < 0``; NaN -> code 0.
    """
    _check_float(x, "x")
    mag = torch.nan_to_num_(x.detach().abs(), nan=0.0)
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    hit = torch.empty(x.shape, dtype=torch.bool, device=x.device)  # one reused comparison buffer
    for bound in _TIE_DOWN:  # midpoints whose tie rounds down count only when exceeded
        index += torch.gt(mag, bound, out=hit)
    for bound in _TIE_UP:  # ... the others when reached
        index += torch.ge(mag, bound, out=hit)
    torch.lt(x.detach(), 0, out=hit)
    return index.bitwise_or_(hit.view(torch.uint8) << 3)


def _check_codes(codes: Tensor, name: str) -> None:
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError(f"{name} must hold 4-bit codes in 0..15")


def e2m1_codes_to_float(codes: Tensor) -> Tensor:
    """uint8 codes 0..15 -> fp32 E2M1 values (code 8 is -0.0), same shape."""
    _check_codes(codes, "codes")
    return _lookup(codes)


def _lookup(codes: Tensor) -> Tensor:
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def pack_fp4(codes: Tensor) -> Tensor:
    """uint8 codes ``[..., n]`` (n even) -> uint8 ``[..., n/2]``; column 2k in the low nibble, 2k+1 high."""
    _check_codes(codes, "codes")
    if codes.dim() < 1 or codes.shape[-1] % 2 != 0:
        raise ValueError(f"pack_fp4 needs an even last dim, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return (c[..., 1::2] << 4) | c[..., 0::2]


def unpack_fp4(packed: Tensor) -> Tensor:
    """uint8 ``[..., m]`` -> uint8 codes ``[..., 2m]`` (inverse of :func:`pack_fp4`)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be torch.uint8, got {packed.dtype}")
    pairs = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _check_convention(convention: ScaleConvention) -> None:
    if convention not in (ScaleConvention.MULTIPLIER, ScaleConvention.DIVISOR):
        raise ValueError(f"NVFP4 global scales are MULTIPLIER or DIVISOR, got {convention!r}")


def _block_scales_divisor(w: Tensor, g: Tensor, n_blocks: int) -> Tensor:
    blocks = w.detach().reshape(*w.shape[:-1], n_blocks, NVFP4_BLOCK)
    block_amax = blocks.abs().amax(dim=-1).float()
    rounded = torch.clamp(g * divide(block_amax, E2M1_MAX), -_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).float()
    rounded = torch.where(rounded == 0, torch.full_like(rounded, _DIVISOR_SCALE_EPS), rounded)
    return rounded.to(torch.float8_e4m3fn)


def _block_scales(w: Tensor, g: Tensor, n_blocks: int) -> Tensor:
    blocks = w.detach().reshape(*w.shape[:-1], n_blocks, NVFP4_BLOCK)
    low, high = torch.aminmax(blocks, dim=-1)  # max |x| per block without a full-size |w| temporary
    block_amax = torch.maximum(high, low.neg()).to(torch.float32)
    scale = block_amax / (E2M1_MAX * g)
    scale = torch.where((scale == 0) | torch.isnan(scale), torch.ones_like(scale), scale)
    return scale.clamp(min=_BLOCK_SCALE_MIN, max=_FP8_MAX).to(torch.float8_e4m3fn)


def nvfp4_block_scales(w: Tensor, global_scale: Tensor | float, convention: ScaleConvention = _MULTIPLIER) -> Tensor:
    """float8_e4m3fn per-16 block scales of ``w [..., in]`` -> ``[..., in/16]`` (modelopt arithmetic).

    ``global_scale``: one element, or one per leading matrix (``w.shape[:-2]``, e.g. per expert).
    """
    _check_float(w, "w")
    _check_convention(convention)
    n_blocks = _check_last_dim(w, "w")
    g = _global_for(w.shape, global_scale, w.device)
    if convention is ScaleConvention.DIVISOR:
        return _block_scales_divisor(w, g, n_blocks)
    return _block_scales(w, g, n_blocks)


def quantize_nvfp4(
    w: Tensor, global_scale: Tensor | float, convention: ScaleConvention = _MULTIPLIER
) -> tuple[Tensor, Tensor]:
    """``w [..., in]`` -> (packed uint8 ``[..., in/2]``, float8_e4m3fn block scale ``[..., in/16]``)."""
    block_scale = nvfp4_block_scales(w, global_scale, convention)
    n_blocks = block_scale.shape[-1]
    g = _global_for(w.shape, global_scale, w.device)
    blocks = w.detach().reshape(*w.shape[:-1], n_blocks, NVFP4_BLOCK)
    if convention is ScaleConvention.DIVISOR:
        step = (block_scale.to(torch.float32) / g).unsqueeze(-1)
        scaled = torch.clamp(blocks / step, -E2M1_MAX, E2M1_MAX)
    else:
        scaled = blocks / (block_scale.to(torch.float32) * g).unsqueeze(-1)
    codes = cast_to_e2m1_codes(scaled).reshape(w.shape)
    return pack_fp4(codes), block_scale


def dequantize_nvfp4(
    packed: Tensor,
    block_scale: Tensor,
    global_scale: Tensor | float,
    dtype: torch.dtype = torch.bfloat16,
    convention: ScaleConvention = _MULTIPLIER,
) -> Tensor:
    """packed uint8 ``[..., in/2]``, fp8 ``[..., in/16]``, fp32 global -> ``dtype`` ``[..., in]``.

    ``e2m1 * (float(block_scale) * global_scale)`` in fp32 (DIVISOR: ``/ global_scale``), rounded once to
    ``dtype``.
    """
    _check_convention(convention)
    codes = unpack_fp4(packed)
    n_blocks = _check_last_dim(codes, "the unpacked codes")
    if tuple(block_scale.shape) != (*codes.shape[:-1], n_blocks):
        raise ValueError(
            f"block_scale must have shape {(*codes.shape[:-1], n_blocks)} for packed shape "
            f"{tuple(packed.shape)}, got {tuple(block_scale.shape)}"
        )
    g = _global_for(codes.shape, global_scale, packed.device)
    if convention is ScaleConvention.DIVISOR:
        per_block = block_scale.to(torch.float32) / g
    else:
        per_block = block_scale.to(torch.float32) * g
    values = _lookup(codes).reshape(*codes.shape[:-1], n_blocks, NVFP4_BLOCK)
    return (values * per_block.unsqueeze(-1)).reshape(codes.shape).to(dtype)


def fake_quantize_nvfp4(x: Tensor, global_scale: Tensor | float, convention: ScaleConvention = _MULTIPLIER) -> Tensor:
    """Dynamic per-16 block NVFP4 along the last dim with a static global scale, in ``x.dtype``.

    Equals ``dequantize_nvfp4(*quantize_nvfp4(x, global_scale), global_scale, x.dtype)``.
    """
    packed, block_scale = quantize_nvfp4(x, global_scale, convention)
    return dequantize_nvfp4(packed, block_scale, global_scale, x.dtype, convention)


# --------------------------------------------------------------------------------------------
# codecs: NVFP4 Linear schemes: W4A4 and weight-only W4A16, in both global-scale conventions (a model meant
# for compressed-tensors is quantized with the divisor from the start: converting afterwards would change decoded
# weights in the last bit)
# --------------------------------------------------------------------------------------------

NVFP4_DIVISOR = replace(NVFP4, convention=ScaleConvention.DIVISOR, stacks=False)
"""NVFP4 W4A4 with compressed-tensors' divisor global scale."""
_WEIGHT_ONLY = ActivationQuant.NONE


class _Nvfp4Activations(FormatCapabilities):
    def input_scale(self, input_amax: torch.Tensor) -> torch.Tensor:
        """The activation global scale in the format's convention (fp32, same shape as ``input_amax``)."""
        return nvfp4_global_scale(input_amax, self.format.convention)

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        if not self.format.needs_calibration:
            return x
        if input_scale is None:
            raise ValueError("NVFP4 activations need the calibrated input global scale")
        return fake_quantize_nvfp4(x, input_scale, self.format.convention)


@dataclass(frozen=True)
class Nvfp4Codec(_Nvfp4Activations):
    """E2M1 weights, FP8 scale per 16 inputs, fp32 0-d multiplier global scale (``amax / 2688``)."""

    scheme: LinearScheme = LinearScheme.NVFP4
    format: NumericFormat = NVFP4

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        block = NVFP4_BLOCK
        return {
            Piece.CODES: TensorSpec(torch.uint8, (out_features, in_features // 2)),
            Piece.SCALE: TensorSpec(torch.float8_e4m3fn, (out_features, in_features // block)),
            Piece.GLOBAL_SCALE: TensorSpec(torch.float32, ()),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        global_scale = nvfp4_global_scale(weight_amax)
        packed, block_scale = kernels.quantize_nvfp4(weight, global_scale)
        return QuantizedPieces(packed, block_scale, global_scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize_nvfp4(pieces[Piece.CODES], pieces[Piece.SCALE], pieces[Piece.GLOBAL_SCALE], dtype)


@dataclass(frozen=True)
class Nvfp4CtCodec(_Nvfp4Activations):
    """E2M1 weights, FP8 scale per 16 inputs, fp32 divisor global scale ``(1,)`` (``2688 / amax``); the input
    scale is the divisor activation global scale."""

    scheme: LinearScheme = LinearScheme.NVFP4_CT
    format: NumericFormat = NVFP4_DIVISOR

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        return {
            Piece.CODES: TensorSpec(torch.uint8, (out_features, in_features // 2)),
            Piece.SCALE: TensorSpec(torch.float8_e4m3fn, (out_features, in_features // NVFP4_BLOCK)),
            Piece.GLOBAL_SCALE: TensorSpec(torch.float32, (1,)),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        global_scale = nvfp4_global_scale(weight_amax, ScaleConvention.DIVISOR).reshape(1)
        packed, block_scale = quantize_nvfp4(weight, global_scale, ScaleConvention.DIVISOR)
        return QuantizedPieces(packed, block_scale, global_scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize_nvfp4(
            pieces[Piece.CODES],
            pieces[Piece.SCALE],
            pieces[Piece.GLOBAL_SCALE],
            dtype,
            ScaleConvention.DIVISOR,
        )


register(Nvfp4Codec())
register(Nvfp4Codec(LinearScheme.W4A16_NVFP4, replace(NVFP4, activations=_WEIGHT_ONLY)))
register(Nvfp4CtCodec())
register(Nvfp4CtCodec(LinearScheme.W4A16_NVFP4_CT, replace(NVFP4_DIVISOR, activations=_WEIGHT_ONLY)))
