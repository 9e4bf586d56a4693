"""What a weight source is: logical checkpoint tensors, read a few at a time onto a device, dequantized.

The layer-sequential pipeline never holds the whole model: it asks a :class:`WeightSource` for one
decoder layer's tensors at a time. A source hides how the checkpoint stores them: plain safetensors,
FP8 128x128 blocks with ``weight_scale_inv`` (DeepSeek-V3/R1, Kimi-K2, Qwen3 ``-FP8``), MXFP4
``_blocks``/``_scales`` pairs (GPT-OSS), or generated on the device (:mod:`.synthetic`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..errors import QuantportError

__all__ = [
    "RowSource",
    "SourceError",
    "SourceFormat",
    "TensorInfo",
    "UnknownTensorError",
    "WeightSource",
    "unknown_names_error",
]


class SourceError(QuantportError):
    """A checkpoint that a weight source cannot read: an unsupported quantization, a malformed tensor pair."""


class UnknownTensorError(SourceError, KeyError):
    """Tensors were asked for by names the source does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SourceFormat(enum.Enum):
    """How the checkpoint stores its weights."""

    PLAIN = "plain"
    """Safetensors tensors read as stored."""
    FP8_BLOCK = "fp8-block"
    """``quant_method: fp8``: float8_e4m3fn ``weight`` plus fp32 ``weight_scale_inv`` per block."""
    MXFP4 = "mxfp4"
    """``quant_method: mxfp4``: GPT-OSS experts as uint8 ``X_blocks`` (two E2M1 codes a byte) and ``X_scales``
    (E8M0)."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A logical tensor: its shape and its dtype after dequantization (bf16 for an FP8-block weight)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@runtime_checkable
class WeightSource(Protocol):
    """Logical checkpoint tensors by name, read onto a device on demand."""

    format: SourceFormat

    def tensors(self) -> Mapping[str, TensorInfo]:
        """Logical checkpoint names -> info. Scale tensors are hidden; an MXFP4 pair ``X_blocks``/``X_scales``
        is one logical ``X``."""
        ...

    def read(self, names: Iterable[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        """Those logical tensors on ``device``, dequantized there, in their logical dtype."""
        ...

    def close(self) -> None:
        """Release open files (reading after ``close`` reopens them)."""
        ...


@runtime_checkable
class RowSource(Protocol):
    """A source that reads part of a logical tensor: rows along its first dimension (e.g. a few experts of a
    fused ``[E, ...]`` experts tensor), so that a large tensor can be filled into its parameter piece by piece."""

    def read_rows(self, name: str, start: int, stop: int, device: torch.device | str) -> torch.Tensor:
        """``tensor[start:stop]`` of the logical tensor ``name`` (at least 3-D) on ``device``, dequantized there;
        equal to the same rows of :meth:`WeightSource.read`'s tensor."""
        ...


def unknown_names_error(missing: list[str], known: Mapping[str, object], where: str) -> UnknownTensorError:
    """The error for names not in a source: how many, the first few, and a few names it does hold."""
    shown = ", ".join(repr(n) for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    sample = ", ".join(repr(n) for n in list(known)[:5])
    return UnknownTensorError(
        f"{len(missing)} tensor name(s) not in {where}: {shown}. It holds {len(known)} logical tensors, "
        f"e.g. {sample}. Use the checkpoint (hub) names that the source's tensors() lists."
    )
