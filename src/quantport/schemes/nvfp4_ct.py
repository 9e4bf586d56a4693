"""NVFP4 with compressed-tensors' numerics (``nvfp4-pack-quantized``): W4A4 and weight-only.

compressed-tensors stores the *divisor* form of the global scale, the reciprocal of ModelOpt's
``weight_scale_2``: ``global = 448 * 6 / amax``. Rounding ``1 / weight_scale_2`` would change the
decoded weights in the last bit, so a model meant for compressed-tensors is quantized with this
convention from the start (the ``nvfp4`` recipe resolves to this scheme for that format).

Arithmetic (all fp32), as compressed-tensors' ``generate_gparam`` / ``calculate_qparams`` /
``quantize`` / ``dequantize`` compute it:

* ``global = 2688 / max(amax, finfo.tiny)``; a NaN or infinite result becomes 1.0;
* ``block_scale = fp8(clamp(global * (block_amax / 6), -448, 448))`` per 16 inputs, and a block scale
  of exactly 0 becomes 0.125 (compressed-tensors' epsilon for FP8 scales);
* ``codes = e2m1(clamp(w / (float(block_scale) / global), -6, 6))`` with round-half-to-even, packed two
  per byte, the even column in the low nibble (the same packing as ModelOpt's);
* ``w ~= e2m1 * (float(block_scale) / global)``, rounded once to the model dtype.

compressed-tensors decompresses NVFP4 to bfloat16, so the decoded weights equal these for bf16 models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..formats.division import divide
from ..formats.nvfp4 import (
    E2M1_MAX,
    NVFP4_BLOCK,
    NVFP4_GLOBAL_DIVISOR,
    cast_to_e2m1_codes,
    e2m1_codes_to_float,
    pack_fp4,
    unpack_fp4,
)
from ..recipes import LinearScheme
from . import TensorSpec, register

__all__ = [
    "Nvfp4CtCodec",
    "ct_nvfp4_global_scale",
    "dequantize_nvfp4_ct",
    "fake_quantize_nvfp4_ct",
    "quantize_nvfp4_ct",
]

_FP8_MAX = 448.0
_FP8_SCALE_EPS = 0.125


def ct_nvfp4_global_scale(amax: Tensor) -> Tensor:
    """fp32 ``2688 / amax`` (same shape as ``amax``); NaN / inf (amax 0 or NaN) -> 1.0."""
    a = torch.as_tensor(amax).detach().float()
    a = torch.clamp(a, min=torch.finfo(torch.float32).tiny)
    return torch.nan_to_num(NVFP4_GLOBAL_DIVISOR / a, nan=1.0, posinf=1.0, neginf=1.0)


def _blocks(x: Tensor) -> Tensor:
    if x.dim() < 1 or x.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs a last dim that is a multiple of {NVFP4_BLOCK}, got shape {tuple(x.shape)}")
    return x.unflatten(-1, (x.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK))


def _global(global_scale: Tensor, device: torch.device) -> Tensor:
    g = torch.as_tensor(global_scale, device=device).float()
    if g.numel() != 1:
        raise ValueError(f"NVFP4 global scale must have one element, got shape {tuple(g.shape)}")
    return g.reshape(())


def quantize_nvfp4_ct(w: Tensor, global_scale: Tensor) -> tuple[Tensor, Tensor]:
    """``w [..., in]`` -> (packed uint8 ``[..., in/2]``, float8_e4m3fn block scale ``[..., in/16]``)."""
    blocks = _blocks(w.detach())
    g = _global(global_scale, w.device)
    block_amax = blocks.abs().amax(dim=-1).float()
    rounded = torch.clamp(g * divide(block_amax, E2M1_MAX), -_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).float()
    rounded = torch.where(rounded == 0, torch.full_like(rounded, _FP8_SCALE_EPS), rounded)
    scale = rounded.to(torch.float8_e4m3fn)
    step = rounded / g
    scaled = torch.clamp(blocks / step.unsqueeze(-1), -E2M1_MAX, E2M1_MAX)
    codes = cast_to_e2m1_codes(scaled.flatten(-2))
    return pack_fp4(codes), scale


def dequantize_nvfp4_ct(
    packed: Tensor, block_scale: Tensor, global_scale: Tensor, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Packed uint8 ``[..., in/2]``, fp8 ``[..., in/16]``, fp32 global -> ``dtype`` ``[..., in]``."""
    values = _blocks(e2m1_codes_to_float(unpack_fp4(packed)))
    if tuple(block_scale.shape) != tuple(values.shape[:-1]):
        raise ValueError(f"block scale shape {tuple(block_scale.shape)} does not match {tuple(values.shape[:-1])}")
    step = block_scale.float() / _global(global_scale, packed.device)
    return (values * step.unsqueeze(-1)).flatten(-2).to(dtype)


def fake_quantize_nvfp4_ct(x: Tensor, global_scale: Tensor) -> Tensor:
    """Dynamic per-16 NVFP4 of activations with a static (divisor) global scale, in ``x.dtype``."""
    packed, scale = quantize_nvfp4_ct(x, global_scale)
    return dequantize_nvfp4_ct(packed, scale, global_scale, x.dtype)


@dataclass(frozen=True)
class Nvfp4CtCodec:
    """NVFP4 in compressed-tensors' layout: ``weight_packed``, ``weight_scale`` (fp8),
    ``weight_global_scale`` (fp32 ``(1,)``, divisor); ``input_scale`` here is the divisor form of the
    activation global scale, written as ``input_global_scale``."""

    scheme: LinearScheme = LinearScheme.NVFP4_CT
    modelopt_algo: str | None = None
    input_multiple: int = NVFP4_BLOCK
    static_input_scale: bool = True
    shared_weight_amax: bool = True  # engines fuse q/k/v and gate/up with one global scale
    group_size: int | None = NVFP4_BLOCK

    def weight_specs(
        self, out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16
    ) -> dict[str, TensorSpec]:
        return {
            "weight_packed": TensorSpec(torch.uint8, (out_features, in_features // 2)),
            "weight_scale": TensorSpec(torch.float8_e4m3fn, (out_features, in_features // NVFP4_BLOCK)),
            "weight_global_scale": TensorSpec(torch.float32, (1,)),
        }

    def quantize_weight(self, weight: Tensor, weight_amax: Tensor) -> dict[str, Tensor]:
        global_scale = ct_nvfp4_global_scale(weight_amax).reshape(1)
        packed, block_scale = quantize_nvfp4_ct(weight, global_scale)
        return {"weight_packed": packed, "weight_scale": block_scale, "weight_global_scale": global_scale}

    def dequantize_weight(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return dequantize_nvfp4_ct(
            tensors["weight_packed"], tensors["weight_scale"], tensors["weight_global_scale"], dtype
        )

    def input_scale(self, input_amax: Tensor) -> Tensor:
        return ct_nvfp4_global_scale(input_amax)

    def fake_quantize_input(self, x: Tensor, input_scale: Tensor | None) -> Tensor:
        if not self.static_input_scale:
            return x
        if input_scale is None:
            raise ValueError("NVFP4 activations need the calibrated input global scale")
        return fake_quantize_nvfp4_ct(x, input_scale)


register(Nvfp4CtCodec())
register(Nvfp4CtCodec(scheme=LinearScheme.W4A16_NVFP4_CT, static_input_scale=False))
