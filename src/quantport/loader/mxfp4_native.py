"""Reading gpt-oss's native MXFP4 experts (``quant_method: mxfp4``).

Per fused experts module ``X`` and parameter ``P`` (``gate_up_proj``, ``down_proj``), already in the
engines' ``[out, in]`` orientation with rows in the model's gate/up order:

* ``X.P_blocks`` uint8 ``[E, out, in/32, 16]``: two E2M1 codes per byte, even element in the low nibble;
* ``X.P_scales`` uint8 E8M0 ``[E, out, in/32]`` (biased by 127);
* ``X.P_bias`` as the model holds it (read by the generic tensor path).

Decoding is :func:`quantport.formats.mx.dequantize_mxfp4` through the MXFP4 codec.
"""

from __future__ import annotations

import torch

from ..formats.mx import MX_BLOCK
from ..recipes import LinearScheme
from ..schemes import SchemeCodec, codec_for
from .checkpoint import CheckpointError, TensorStore
from .linear import read_tensors

__all__ = ["MXFP4_CODEC_SCHEME", "dequantize_native_mxfp4", "has_native_mxfp4"]

MXFP4_CODEC_SCHEME = LinearScheme.MXFP4
"""The scheme whose codec decodes native MXFP4 blocks."""


def has_native_mxfp4(store: TensorStore, prefix: str) -> bool:
    """Whether the experts module stored under ``prefix`` is in the native MXFP4 form."""
    return f"{prefix}.gate_up_proj_blocks" in store


def dequantize_native_mxfp4(
    store: TensorStore, prefix: str, param: str, out_in: tuple[int, int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, SchemeCodec]:
    """Dense ``[E, out, in]`` weights of fused expert parameter ``param`` stored under ``prefix``."""
    codec = codec_for(MXFP4_CODEC_SCHEME)
    names = {"weight_packed": f"{prefix}.{param}_blocks", "weight_scale": f"{prefix}.{param}_scales"}
    stored = read_tensors(store, names, "native mxfp4")
    blocks, scales = stored["weight_packed"], stored["weight_scale"]
    experts, rows, cols = out_in
    expected = {
        "weight_packed": (experts, rows, cols // MX_BLOCK, MX_BLOCK // 2),
        "weight_scale": (experts, rows, cols // MX_BLOCK),
    }
    for key, tensor in stored.items():
        if tuple(tensor.shape) != expected[key] or tensor.dtype != torch.uint8:
            raise CheckpointError(
                f"{names[key]} is {tensor.dtype} {tuple(tensor.shape)}; the model needs uint8 {expected[key]}"
            )
    weight = codec.dequantize_weight({"weight_packed": blocks.flatten(-2), "weight_scale": scales}, dtype)
    return weight, codec
