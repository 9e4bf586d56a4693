"""Dequantizing ModelOpt unified-checkpoint tensors back to dense weights.

The numerics are the scheme codecs' (:mod:`quantport.schemes`, built on :mod:`quantport.formats`), so
a checkpoint quantport wrote decodes to exactly the weights its simulation used. ModelOpt's names for the
codec's pieces and its ``quant_algo`` table are :mod:`quantport.dialects.modelopt`, the exporter's own;
this module knows the *layouts*:

* a quantized Linear (or one expert's projection) ``P`` stores ``P.weight`` plus the codec's scale
  tensors ``P.weight_scale``, ``P.weight_scale_2`` and, for static activations, ``P.input_scale``;
* fused 3-D experts (Llama 4, GPT-OSS) store ``X.gate_up_proj`` with ``X.gate_up_proj_weight_scale``,
  ``X.gate_up_proj_weight_scale_2``, ``X.gate_up_proj_input_scale`` (likewise ``down_proj``), each scale
  either one value for all experts or one slice per expert. ModelOpt blocks NVFP4 along the input
  dimension and stores the result in the model's ``[E, in, out]`` orientation (weight
  ``[E, in/2, out]``, block scale ``[E, in/16, out]``), while it blocks MXFP8 along the stored last
  dimension; which orientation a tensor uses is read off the shapes, which never fit both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dialects.modelopt import ALGO_SCHEMES, fused_name, linear_suffix, scheme_for_algo
from ..formats.descriptors import ActivationQuant
from ..formats.pieces import Piece
from ..read.dialect import QuantizedModule
from ..read.quant_config import Dialect
from ..schemes import SchemeCodec, codec_for
from .checkpoint import CheckpointError, TensorStore
from .linear import DecodedLinear, DialectDecoder, read_tensors

__all__ = [
    "DECODER",
    "DenseWeight",
    "ModelOptDecoder",
    "codec_for_algo",
    "dequantize_fused",
    "dequantize_linear",
    "quantizes_activations",
]


@dataclass(frozen=True, slots=True)
class DenseWeight:
    """A dequantized weight and the activation scale stored beside it.

    Attributes:
        weight: dense weight in the model's layout and dtype.
        input_scale: fp32 stored ``input_scale`` (0-d, or ``[E]`` for experts), None when absent.
    """

    weight: torch.Tensor
    input_scale: torch.Tensor | None


def codec_for_algo(algo: str) -> SchemeCodec:
    """The codec of ModelOpt ``quant_algo`` ``algo`` (case-insensitive)."""
    scheme = scheme_for_algo(algo)
    if scheme is None:
        known = ", ".join(sorted(ALGO_SCHEMES))
        raise CheckpointError(f"ModelOpt quant_algo {algo!r} is not supported by quantport.load; supported: {known}")
    return codec_for(scheme)


def quantizes_activations(codec: SchemeCodec) -> bool:
    """Whether ``codec`` changes activations (static or dynamic), False for weight-only schemes."""
    return codec.format.activations is not ActivationQuant.NONE


def _check_shape(weight: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if tuple(weight.shape) != tuple(shape):
        raise CheckpointError(f"{name} decodes to shape {tuple(weight.shape)}, but the model expects {tuple(shape)}")
    return weight


def _input_scale(store: TensorStore, name: str, codec: SchemeCodec) -> torch.Tensor | None:
    if name not in store:
        return None
    scale = store.get(name)
    return scale.float() if codec.static_input_scale else None


def dequantize_linear(
    store: TensorStore, prefix: str, codec: SchemeCodec, shape: tuple[int, int], dtype: torch.dtype
) -> DenseWeight:
    """Dense ``[out, in]`` weight of the quantized Linear stored under ``prefix``."""
    specs = codec.weight_specs(*shape)
    tensors = read_tensors(store, {piece: f"{prefix}.{linear_suffix(piece)}" for piece in specs}, codec.scheme.value)
    pre_quant_scale = f"{prefix}.pre_quant_scale"
    if pre_quant_scale in store:  # AWQ: y = W (x * s), i.e. the dense weight is W * s, rounded once
        weight = codec.dequantize_weight(tensors, torch.float32) * store.get(pre_quant_scale).float()
        weight = weight.to(dtype)
    else:
        weight = codec.dequantize_weight(tensors, dtype)
    _check_shape(weight, shape, f"{prefix}.weight")
    return DenseWeight(weight, _input_scale(store, f"{prefix}.{linear_suffix(Piece.INPUT_SCALE)}", codec))


def _per_expert(tensor: torch.Tensor, expert: int, num_experts: int, name: str) -> torch.Tensor:
    if tensor.dim() == 0:
        return tensor
    if tensor.shape[0] != num_experts:
        raise CheckpointError(f"{name} has shape {tuple(tensor.shape)}; expected one value or one slice per expert")
    return tensor[expert]


def _swap(tensor: torch.Tensor) -> torch.Tensor:
    """The other orientation of a weight or scale: 2-D transposed, 4-D block grid permuted."""
    if tensor.numel() == 1 or tensor.dim() < 2:
        return tensor
    if tensor.dim() == 4:  # [ob, 1, ib, 1] block grid
        return tensor.permute(2, 1, 0, 3)
    return tensor.transpose(-1, -2)


def _fits(codec: SchemeCodec, tensors: dict[Piece, torch.Tensor], out_features: int, in_features: int) -> bool:
    specs = codec.weight_specs(out_features, in_features)
    for piece, spec in specs.items():
        actual = tensors[piece]
        if tuple(actual.shape) != spec.shape and not (piece is not Piece.CODES and actual.numel() == 1):
            return False
    return True


def dequantize_fused(
    store: TensorStore,
    prefix: str,
    param: str,
    codec: SchemeCodec,
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    out_in_transposed: bool,
) -> DenseWeight:
    """Dense ``[E, a, b]`` fused expert parameter ``param`` stored with ModelOpt's fused names.

    ``out_in_transposed``: the parameter is ``[E, in, out]`` (so its ``[out, in]`` view, the one
    engines quantize, is the transpose); that orientation is tried first.
    """
    num_experts, rows, cols = shape
    specs = codec.weight_specs(rows, cols)
    names = {piece: f"{prefix}.{fused_name(param, piece)}" for piece in specs}
    tensors = read_tensors(store, names, codec.scheme.value)
    first = {k: _per_expert(v, 0, num_experts, names[k]) for k, v in tensors.items()}
    orientations = (True, False) if out_in_transposed else (False, True)
    fitting = [
        t
        for t in orientations
        if _fits(codec, {k: _swap(v) if t else v for k, v in first.items()}, *((cols, rows) if t else (rows, cols)))
    ]
    transpose = (fitting or orientations)[0]
    experts = []
    for e in range(num_experts):
        part = {k: _per_expert(v, e, num_experts, names[k]) for k, v in tensors.items()}
        if transpose:
            part = {k: _swap(v) for k, v in part.items()}
        dense = codec.dequantize_weight(part, dtype)
        experts.append(dense.transpose(-1, -2) if transpose else dense)
    weight = _check_shape(torch.stack(experts), shape, names[Piece.CODES])
    scale = _input_scale(store, f"{prefix}.{fused_name(param, Piece.INPUT_SCALE)}", codec)
    if scale is not None:
        scale = scale.reshape(-1).expand(num_experts) if scale.numel() == 1 else scale.reshape(num_experts)
    return DenseWeight(weight, scale)


class ModelOptDecoder:
    """:class:`~quantport.loader.linear.LinearDecoder` of ModelOpt unified checkpoints."""

    def decode(
        self, store: TensorStore, module: QuantizedModule, shape: tuple[int, int], dtype: torch.dtype
    ) -> DecodedLinear:
        if module.scheme is None:
            raise CheckpointError(
                f"{module.name} has scale tensors, but the checkpoint config names no quant_algo for it"
            )
        codec = codec_for_algo(module.scheme)
        dense = dequantize_linear(store, module.name, codec, shape, dtype)
        return DecodedLinear(dense.weight, codec, dense.input_scale, module.scheme)


DECODER = DialectDecoder(Dialect.MODELOPT, ModelOptDecoder())
"""This dialect's Linear decoder, for :mod:`quantport.loader`."""
