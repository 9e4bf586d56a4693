"""OCP microscaling (MX) formats: MXFP8 (E4M3 elements) and MXFP4 (E2M1 elements).

Every block of ``MX_BLOCK`` (32) consecutive elements along the last (input) dimension shares one
E8M0 scale, stored as a ``uint8`` biased exponent (bias 127), so the scale is ``2 ** (u - 127)``.

The arithmetic follows nvidia-modelopt 0.47 (``MXFP8QTensor`` and ``MXFP4QTensor``) bit for bit:

* shared exponent ``e = clamp(ceil(log2(block_amax / element_max)), -127, 127)``, computed in fp32
  with ``torch.log2``. A block whose amax is 0 gets ``e = -127`` (``u = 0``). ``element_max`` is
  the largest element magnitude (448 for E4M3, 6 for E2M1), not the OCP ``emax_elem``. OCP's
  ``floor(log2(amax)) - emax_elem`` is a different rule.
* MXFP8: ``fp8(clamp(x * 2**-e, -448, 448))``, cast with round-to-nearest-even.
* MXFP4: ``x / 2**e``, then E2M1 rounding as modelopt's ``MXFP4QTensor`` does it. Exact ties round
  toward zero (0.25->0, 0.75->0.5, 1.25->1, 1.75->1.5, 2.5->2, 3.5->3, 5->4), and magnitudes
  above 6 saturate. Zero, both +0 and -0, is encoded with the sign bit set (code 0b1000, -0.0).
  This is not NVFP4's E2M1 cast (round-half-even, +0 -> 0b0000), so the cast is private to this
  module. Packing (two codes per byte, even column in the low nibble) and decoding are the same as
  for NVFP4, so those are imported from :mod:`quantport.formats.nvfp4`.

All functions are pure. They accept any number of leading dimensions ``[..., in]`` (a 2-D weight
``[out, in]``, or 3-D MoE experts ``[E, out, in]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .. import kernels
from ..recipes import LinearScheme
from ..schemes.codec import DynamicActivations, TensorSpec, WeightOnly
from ..schemes.registry import register
from .descriptors import ActivationQuant, Element, NumericFormat, ScaleGranularity, ScaleType
from .division import divide
from .nvfp4 import E2M1_MAX, e2m1_codes_to_float, pack_fp4, unpack_fp4
from .pieces import Piece, QuantizedPieces

__all__ = [
    "dequantize_mxfp4",
    "dequantize_mxfp8",
    "E4M3_MAX",
    "e8m0_to_float",
    "fake_quantize_mxfp4",
    "fake_quantize_mxfp8",
    "MX_BLOCK",
    "mx_shared_exponent",
    "MXFP4_WEIGHTS",
    "Mxfp4Codec",
    "MXFP8_DYNAMIC",
    "Mxfp8Codec",
    "quantize_mxfp4",
    "quantize_mxfp8",
]

MX_BLOCK = 32
"""Number of elements sharing one E8M0 scale (along the last dimension)."""

E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn magnitude."""

MXFP8_DYNAMIC = NumericFormat(
    "mxfp8", Element.FP8_E4M3, ScaleGranularity.GROUP, MX_BLOCK, ScaleType.E8M0, torch.uint8,
    ActivationQuant.DYNAMIC, input_multiple=MX_BLOCK, stacks=True,
)  # fmt: skip
"""FP8 weights and activations with an E8M0 scale per 32 inputs (activations per block at run time)."""
MXFP4_WEIGHTS = NumericFormat(
    "mxfp4", Element.E2M1, ScaleGranularity.GROUP, MX_BLOCK, ScaleType.E8M0, torch.uint8,
    ActivationQuant.NONE, input_multiple=MX_BLOCK, stacks=True,
)  # fmt: skip
"""E2M1 weights with an E8M0 scale per 32 inputs; activations unquantized."""

_E8M0_BIAS = 127
# Decision boundaries between consecutive E2M1 magnitudes [0, .5, 1, 1.5, 2, 3, 4, 6].
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _check_last_dim(x: torch.Tensor, name: str) -> int:
    """Return the number of MX blocks along the last dim of ``x``, or raise ValueError."""
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension, got a 0-d tensor")
    n = x.shape[-1]
    if n % MX_BLOCK != 0:
        raise ValueError(f"{name}: last dimension ({n}) must be a multiple of the MX block size {MX_BLOCK}")
    return n // MX_BLOCK


def _check_scale(scale: torch.Tensor, lead: torch.Size, nblocks: int) -> None:
    if scale.dtype != torch.uint8:
        raise TypeError(f"E8M0 scale must be torch.uint8, got {scale.dtype}")
    expected = (*lead, nblocks)
    if tuple(scale.shape) != expected:
        raise ValueError(f"E8M0 scale has shape {tuple(scale.shape)}, expected {expected}")


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 biased exponents (``uint8``, any shape) to fp32 ``2 ** (u - 127)``.

    ``u = 0`` gives ``2**-127``, an fp32 subnormal. ``u = 255`` gives ``inf``, as in modelopt's
    ``exp2(u - 127)``. OCP reserves 255 for NaN, and no quantizer here produces it.
    """
    if scale.dtype != torch.uint8:
        raise TypeError(f"E8M0 scale must be torch.uint8, got {scale.dtype}")
    return torch.exp2(scale.float() - _E8M0_BIAS)


def mx_shared_exponent(block_amax: torch.Tensor, element_max: float) -> torch.Tensor:
    """Compute the biased E8M0 exponent (``uint8``, same shape as ``block_amax``) as modelopt does.

    ``e = clamp(ceil(log2(amax.float() / element_max)), -127, 127)``, and ``-127`` where the
    ratio is not positive (zero block, NaN). Returns ``e + 127``. ``element_max`` is the largest
    magnitude of the element format: ``E4M3_MAX`` (448) or ``E2M1_MAX`` (6).
    """
    descale = divide(block_amax.float(), element_max)  # the same bits on CUDA (see formats.division)
    floor_exp = torch.tensor(-127.0, device=descale.device)
    log2_descale = torch.where(descale > 0, torch.log2(descale), floor_exp)
    exponent = torch.clamp(torch.ceil(log2_descale), min=-127, max=127)
    return (exponent + _E8M0_BIAS).to(torch.uint8)


def _block_amax(x: torch.Tensor, nblocks: int) -> torch.Tensor:
    """Return the per-block max |x|, shape ``[..., nblocks]`` in x's dtype (exact)."""
    return x.unflatten(-1, (nblocks, MX_BLOCK)).abs().amax(dim=-1)


# --------------------------------------------------------------------------------------------
# MXFP8
# --------------------------------------------------------------------------------------------


def quantize_mxfp8(w: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [..., in]`` (float) to MXFP8.

    Returns ``(codes float8_e4m3fn [..., in], scale uint8 [..., in/32])``. If ``scale`` (uint8 E8M0)
    is given it is used as is, like modelopt's ``quantize_with_scale``. Otherwise it is computed
    from the block amax.
    """
    nblocks = _check_last_dim(w, "quantize_mxfp8")
    if scale is None:
        scale = mx_shared_exponent(_block_amax(w, nblocks), E4M3_MAX)
    else:
        _check_scale(scale, w.shape[:-1], nblocks)
    # modelopt multiplies by 2**(127 - u), rather than dividing by 2**(u - 127).
    inv_scale = torch.exp2(_E8M0_BIAS - scale.float())
    scaled = w.unflatten(-1, (nblocks, MX_BLOCK)) * inv_scale.unsqueeze(-1)
    codes = torch.clamp(scaled, min=-E4M3_MAX, max=E4M3_MAX).to(torch.float8_e4m3fn)
    return codes.flatten(-2), scale


def dequantize_mxfp8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize MXFP8 ``codes [..., in]`` with E8M0 ``scale uint8 [..., in/32]`` to ``dtype``.

    The product is computed in fp32 and then cast to ``dtype``.
    """
    if codes.dtype != torch.float8_e4m3fn:
        raise TypeError(f"MXFP8 codes must be torch.float8_e4m3fn, got {codes.dtype}")
    nblocks = _check_last_dim(codes, "dequantize_mxfp8")
    _check_scale(scale, codes.shape[:-1], nblocks)
    blocks = codes.float().unflatten(-1, (nblocks, MX_BLOCK))
    out = blocks * e8m0_to_float(scale).unsqueeze(-1)
    return out.flatten(-2).to(dtype)


def fake_quantize_mxfp8(x: torch.Tensor) -> torch.Tensor:
    """Dynamic MXFP8 quantize-dequantize along the last dim. Same shape and dtype as ``x``."""
    codes, scale = quantize_mxfp8(x)
    return dequantize_mxfp8(codes, scale, x.dtype)


# --------------------------------------------------------------------------------------------
# MXFP4 (private E2M1 cast: modelopt's MXFP4 rounding differs from the NVFP4 one, see module doc)
# --------------------------------------------------------------------------------------------


def _cast_e2m1_codes_mx(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``x`` to 4-bit E2M1 codes (``uint8``, values 0..15) with MXFP4QTensor's rules.

    magnitude code = number of decision bounds strictly below ``|x|`` (so ties go toward zero),
    sign bit = ``not (x > 0)`` (so +0 and -0 both become 0b1000). NaN input is unspecified.
    """
    bounds = torch.tensor(_E2M1_BOUNDS, dtype=x.dtype, device=x.device)
    magnitude = torch.bucketize(x.abs(), bounds, right=False)
    sign_bit = (x <= 0).to(torch.int64)
    return (sign_bit * 8 + magnitude).to(torch.uint8)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [..., in]`` (float) to MXFP4.

    Returns ``(packed uint8 [..., in/2], scale uint8 [..., in/32])``. Each byte holds two E2M1
    codes, with the even column in the low nibble.
    """
    nblocks = _check_last_dim(w, "quantize_mxfp4")
    blocks = w.unflatten(-1, (nblocks, MX_BLOCK))
    scale = mx_shared_exponent(blocks.float().abs().amax(dim=-1), E2M1_MAX)
    scaled = blocks / e8m0_to_float(scale).unsqueeze(-1)  # fp32, as in modelopt
    codes = _cast_e2m1_codes_mx(scaled.flatten(-2))
    return pack_fp4(codes), scale


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize MXFP4 ``packed uint8 [..., in/2]`` with ``scale uint8 [..., in/32]`` to ``[..., in]``.

    The product is computed in fp32 and then cast to ``dtype``.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"MXFP4 packed data must be torch.uint8, got {packed.dtype}")
    if packed.dim() < 1:
        raise ValueError("dequantize_mxfp4: packed must have at least one dimension")
    in_features = packed.shape[-1] * 2
    if in_features % MX_BLOCK != 0:
        raise ValueError(
            f"dequantize_mxfp4: unpacked last dimension ({in_features}) must be a multiple of "
            f"the MX block size {MX_BLOCK}"
        )
    nblocks = in_features // MX_BLOCK
    _check_scale(scale, packed.shape[:-1], nblocks)
    values = e2m1_codes_to_float(unpack_fp4(packed))
    out = values.unflatten(-1, (nblocks, MX_BLOCK)) * e8m0_to_float(scale).unsqueeze(-1)
    return out.flatten(-2).to(dtype)


def fake_quantize_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """Dynamic MXFP4 quantize-dequantize along the last dim. Same shape and dtype as ``x``."""
    packed, scale = quantize_mxfp4(x)
    return dequantize_mxfp4(packed, scale, x.dtype)


# --------------------------------------------------------------------------------------------
# codecs: MXFP8 (weights and activations) and MXFP4 (weight-only) Linear schemes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mxfp8Codec(DynamicActivations):
    """MXFP8 W8A8; activations are quantized dynamically per 32-block."""

    scheme: LinearScheme = LinearScheme.MXFP8
    format: NumericFormat = MXFP8_DYNAMIC

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        return {
            Piece.CODES: TensorSpec(torch.float8_e4m3fn, (out_features, in_features)),
            Piece.SCALE: TensorSpec(torch.uint8, (out_features, in_features // MX_BLOCK)),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        codes, scale = quantize_mxfp8(weight)
        return QuantizedPieces(codes, scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize_mxfp8(pieces[Piece.CODES], pieces[Piece.SCALE], dtype)

    def fake_quantize_input(self, x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        return fake_quantize_mxfp8(x)


register(Mxfp8Codec())


@dataclass(frozen=True)
class Mxfp4Codec(WeightOnly):
    """Codes uint8 ``[out, in/2]`` (two E2M1 codes per byte, even column low), scale uint8 E8M0
    ``[out, in/32]``; activations unquantized."""

    scheme: LinearScheme = LinearScheme.MXFP4
    format: NumericFormat = MXFP4_WEIGHTS

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[Piece, TensorSpec]:
        return {
            Piece.CODES: TensorSpec(torch.uint8, (out_features, in_features // 2)),
            Piece.SCALE: TensorSpec(torch.uint8, (out_features, in_features // MX_BLOCK)),
        }

    def quantize_weight(self, weight: torch.Tensor, weight_amax: torch.Tensor) -> QuantizedPieces:
        packed, scale = kernels.quantize_mxfp4(weight.detach())
        return QuantizedPieces(packed, scale)

    def dequantize_weight(self, pieces: Mapping[Piece, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return dequantize_mxfp4(pieces[Piece.CODES], pieces[Piece.SCALE], dtype)


register(Mxfp4Codec())
