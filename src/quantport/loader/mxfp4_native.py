"""Reading gpt-oss's native MXFP4 experts (``quant_method: mxfp4``).

Per fused experts module ``X`` and parameter ``P`` (``gate_up_proj``, ``down_proj``), already in the
engines' ``[out, in]`` orientation with rows in the model's gate/up order:

* ``X.P_blocks`` uint8 ``[E, out, in/32, 16]``: two E2M1 codes per byte, even element in the low nibble;
* ``X.P_scales`` uint8 E8M0 ``[E, out, in/32]`` (biased by 127);
* ``X.P_bias`` as the model holds it (read by the generic tensor path).

The names are :mod:`quantport.dialects.mxfp4_native`'s (the exporter's); decoding is
:func:`quantport.formats.mx.dequantize_mxfp4` through the MXFP4 codec.
"""

from __future__ import annotations

import torch

from ..dialects.mxfp4_native import SCHEME, blocks_shape, stored_name
from ..formats.mx import MX_BLOCK
from ..formats.pieces import Piece
from ..read.quant_config import Dialect
from ..schemes import SchemeCodec, codec_for
from .checkpoint import CheckpointError, TensorStore
from .linear import DialectDecoder, NoQuantizedLinears, read_tensors

__all__ = ["DECODER", "MXFP4_CODEC_SCHEME", "dequantize_native_mxfp4", "has_native_mxfp4"]

MXFP4_CODEC_SCHEME = SCHEME
"""The scheme whose codec decodes native MXFP4 blocks."""


def has_native_mxfp4(store: TensorStore, prefix: str) -> bool:
    """Whether the experts module stored under ``prefix`` is in the native MXFP4 form."""
    return f"{prefix}.{stored_name('gate_up_proj', Piece.CODES)}" in store


def dequantize_native_mxfp4(
    store: TensorStore, prefix: str, param: str, out_in: tuple[int, int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, SchemeCodec]:
    """Dense ``[E, out, in]`` weights of fused expert parameter ``param`` stored under ``prefix``."""
    codec = codec_for(MXFP4_CODEC_SCHEME)
    names = {piece: f"{prefix}.{stored_name(param, piece)}" for piece in (Piece.CODES, Piece.SCALE)}
    stored = read_tensors(store, names, "native mxfp4")
    blocks, scales = stored[Piece.CODES], stored[Piece.SCALE]
    experts, rows, cols = out_in
    scale_shape = (experts, rows, cols // MX_BLOCK)
    expected = {Piece.CODES: blocks_shape(scale_shape), Piece.SCALE: scale_shape}
    for key, tensor in stored.items():
        if tuple(tensor.shape) != expected[key] or tensor.dtype != torch.uint8:
            raise CheckpointError(
                f"{names[key]} is {tensor.dtype} {tuple(tensor.shape)}; the model needs uint8 {expected[key]}"
            )
    weight = codec.dequantize_weight({Piece.CODES: blocks.flatten(-2), Piece.SCALE: scales}, dtype)
    return weight, codec


DECODER = DialectDecoder(Dialect.MXFP4, NoQuantizedLinears())
"""Native MXFP4 checkpoints store every Linear unquantized, for :mod:`quantport.loader`."""
