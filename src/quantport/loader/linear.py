"""What a dialect reader returns for one quantized Linear (or one expert's projection).

Each dialect module (:mod:`.modelopt`, :mod:`.compressed_tensors`) implements :class:`LinearDecoder`:
given the checkpoint prefix of a module the dialect detection marked quantized, it reads that
dialect's tensor names and layouts and decodes the weight with the scheme codec's numerics. A dialect module
names its decoder in ``DECODER`` (a :class:`DialectDecoder`); :mod:`quantport.loader` finds them by discovery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from ..read.dialect import QuantizedModule
from ..read.quant_config import Dialect
from ..schemes import SchemeCodec
from .checkpoint import CheckpointError, TensorStore

__all__ = ["DecodedLinear", "DialectDecoder", "LinearDecoder", "NoQuantizedLinears", "read_tensors"]

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class DecodedLinear:
    """A dequantized weight, the codec that decodes (and fake-quantizes inputs for) it, and its stored input scale.

    Attributes:
        weight: dense ``[out, in]`` weight in the model dtype.
        codec: the scheme codec of the module.
        input_scale: fp32 stored activation scale in the codec's convention (0-d), None when absent.
        scheme: how the checkpoint names the scheme (ModelOpt ``quant_algo``, compressed-tensors scheme).
        activations_known: False when the stored activation scheme differs from the codec's, so the
            activations cannot be simulated (the weights still decode exactly).
    """

    weight: torch.Tensor
    codec: SchemeCodec
    input_scale: torch.Tensor | None
    scheme: str
    activations_known: bool = True


class LinearDecoder(Protocol):
    """Decodes one dialect's quantized Linear modules."""

    def decode(
        self, store: TensorStore, module: QuantizedModule, shape: tuple[int, int], dtype: torch.dtype
    ) -> DecodedLinear:
        """The dense weight of ``module`` (checkpoint prefix ``module.name``), expected ``shape`` ``[out, in]``."""
        ...


@dataclass(frozen=True, slots=True)
class DialectDecoder:
    """The Linear decoder of one dialect (a dialect module's ``DECODER``)."""

    dialect: Dialect
    decoder: LinearDecoder


class NoQuantizedLinears:
    """The decoder of dialects whose Linear layers are all stored unquantized (native MXFP4: experts only)."""

    def decode(
        self, store: TensorStore, module: QuantizedModule, shape: tuple[int, int], dtype: torch.dtype
    ) -> DecodedLinear:
        raise CheckpointError(
            f"{module.name} has quantization tensors, but a native MXFP4 (quant_method mxfp4) checkpoint "
            "quantizes only the gpt-oss experts"
        )


def read_tensors(store: TensorStore, names: dict[K, str], scheme: str) -> dict[K, torch.Tensor]:
    """``names`` (piece -> checkpoint tensor name) read from ``store``; every one must exist."""
    missing = [n for n in names.values() if n not in store]
    if missing:
        raise CheckpointError(
            f"{scheme} needs tensor(s) {', '.join(missing)}, which the checkpoint lacks; "
            "the checkpoint is incomplete or was written for another scheme"
        )
    return {key: store.get(name) for key, name in names.items()}
