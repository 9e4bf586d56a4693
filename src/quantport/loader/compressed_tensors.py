"""Reading compressed-tensors checkpoints (``quant_method: compressed-tensors``), as quantport and
llm-compressor write them.

A module's config group (:func:`~quantport.read.dialect.ct_group_for`) carries compressed-tensors'
``QuantizationArgs`` for weights and input activations. :data:`CT_WEIGHT_SCHEMES`, derived from the
exporter's own rows (:data:`quantport.dialects.compressed_tensors.CT_SCHEMES`), maps the weight
arguments to the quantport scheme whose codec decodes them (the codec's numerics are
compressed-tensors' own: divisor NVFP4 global scale, half-step integer scales in the stored dtype);
the stored tensors are read under the row's names for the codec's pieces, reshaped to the codec's
layout (``(1,)`` scalars to 0-d, ``[out, 1]`` per-channel scales to ``[out]``) and decoded by the
codec. When the stored activation arguments differ from the scheme's (e.g. static INT8 activations),
the weights still decode exactly but the activations cannot be simulated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..dialects.compressed_tensors import CT_SCHEMES, InputKey, WeightKey, input_key, schemes_by_args, weight_key
from ..formats.pieces import Piece
from ..read.dialect import QuantizedModule
from ..read.quant_config import CTGroup, Dialect
from ..recipes import LinearScheme
from ..schemes import SchemeCodec, codec_for
from .checkpoint import CheckpointError, TensorStore
from .linear import DecodedLinear, DialectDecoder, read_tensors

__all__ = ["CT_WEIGHT_SCHEMES", "DECODER", "CtDecoder", "CtSchemeMatch", "ct_scheme_for"]

CT_WEIGHT_SCHEMES: dict[WeightKey, dict[InputKey, LinearScheme]] = schemes_by_args()
"""compressed-tensors weight arguments -> (input arguments -> scheme), from the exporter's rows; the first
entry decides the weights when the input arguments are not listed."""


@dataclass(frozen=True, slots=True)
class CtSchemeMatch:
    """The scheme whose codec decodes a config group, and whether its activation arguments are the scheme's."""

    scheme: LinearScheme
    activations_known: bool


def ct_scheme_for(group: CTGroup) -> CtSchemeMatch:
    """The scheme of config group ``group``; a :class:`CheckpointError` naming the arguments it cannot decode."""
    if group.weights is None:
        raise CheckpointError(f"compressed-tensors config group {group.name!r} quantizes no weights")
    key = weight_key(group.weights)
    by_inputs = CT_WEIGHT_SCHEMES.get(key)
    if by_inputs is None:
        kind, bits, strategy, size, symmetric = key
        raise CheckpointError(
            f"compressed-tensors config group {group.name!r}: {kind}{bits} {strategy} weights"
            f"{f' group {size}' if size else ''}{'' if symmetric else ' asymmetric'} are not supported by "
            "quantport.load (it reads FP8 tensor/channel/128x128 block, NVFP4, MXFP4, INT8 channel and "
            "INT4/INT8 group-128 weights)"
        )
    inputs = input_key(group.input_activations)
    if inputs in by_inputs:
        return CtSchemeMatch(by_inputs[inputs], True)
    return CtSchemeMatch(next(iter(by_inputs.values())), False)


def _codec_layout(tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if tuple(tensor.shape) == shape:
        return tensor
    if tensor.numel() != math.prod(shape):
        raise CheckpointError(f"{name} has shape {tuple(tensor.shape)}; this scheme stores {shape} values")
    return tensor.reshape(shape)


def decode_ct_weight(
    store: TensorStore, prefix: str, codec: SchemeCodec, shape: tuple[int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dense ``[out, in]`` weight, stored input scale or None) of the module stored under ``prefix``."""
    row = CT_SCHEMES[codec.scheme]
    specs = codec.weight_specs(*shape, dtype)
    names = {piece: f"{prefix}.{row.suffix(piece)}" for piece in specs}
    stored = read_tensors(store, names, codec.scheme.value)
    tensors = {piece: _codec_layout(t, specs[piece].shape, names[piece]) for piece, t in stored.items()}
    weight = codec.dequantize_weight(tensors, dtype)
    if tuple(weight.shape) != shape:
        raise CheckpointError(f"{prefix} decodes to shape {tuple(weight.shape)}, the model expects {shape}")
    if not codec.static_input_scale:
        return weight, None
    input_name = store.first([f"{prefix}.{row.suffix(Piece.INPUT_SCALE)}", f"{prefix}.input_scale"])
    return weight, None if input_name is None else store.get(input_name).float().reshape(())


class CtDecoder:
    """:class:`~quantport.loader.linear.LinearDecoder` of compressed-tensors checkpoints."""

    def decode(
        self, store: TensorStore, module: QuantizedModule, shape: tuple[int, int], dtype: torch.dtype
    ) -> DecodedLinear:
        if module.ct_group is None:
            raise CheckpointError(
                f"{module.name} has quantization tensors, but no compressed-tensors config group targets it"
            )
        match = ct_scheme_for(module.ct_group)
        codec = codec_for(match.scheme)
        weight, input_scale = decode_ct_weight(store, module.name, codec, shape, dtype)
        return DecodedLinear(weight, codec, input_scale, match.scheme.value, match.activations_known)


DECODER = DialectDecoder(Dialect.COMPRESSED_TENSORS, CtDecoder())
"""This dialect's Linear decoder, for :mod:`quantport.loader`."""
