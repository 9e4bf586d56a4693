"""What every checkpoint dialect is: its name, the schemes it stores exactly, and its content builder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from ...errors import ExportError
from ...recipes import LinearScheme

if TYPE_CHECKING:
    from torch import nn

    from ...state import QuantizationState
    from ..content import CheckpointContent

__all__ = ["ExportFormat", "Target", "UnsupportedFormatError"]


class ExportFormat(str, Enum):
    """Checkpoint formats (dialects) quantport writes."""

    MODELOPT = "modelopt"
    """NVIDIA ModelOpt unified HF checkpoint (``quant_method: modelopt``): vLLM, SGLang, TensorRT-LLM."""
    COMPRESSED_TENSORS = "compressed-tensors"
    """compressed-tensors checkpoint (``quant_method: compressed-tensors``): vLLM, SGLang, transformers."""
    MXFP4 = "mxfp4"
    """gpt-oss's native MXFP4 MoE checkpoint (``quant_method: mxfp4``, ``*_blocks`` / ``*_scales``):
    vLLM, SGLang, transformers. MXFP4 experts only; everything else in the model dtype."""

    def __str__(self) -> str:
        return self.value


class UnsupportedFormatError(ExportError):
    """A recipe or scheme has no form in the requested checkpoint format."""


@dataclass(frozen=True, slots=True)
class Target:
    """One checkpoint dialect.

    Attributes:
        format: its name.
        schemes: the Linear schemes whose numerics it stores exactly and an engine reads.
        content: (quantized model, its state) -> the tensors, ``quantization_config`` and side files; it may
            refuse the model with an :class:`UnsupportedFormatError` before anything is written.
    """

    format: ExportFormat
    schemes: frozenset[LinearScheme]
    content: Callable[[nn.Module, QuantizationState], CheckpointContent]

    def accepts(self, scheme: LinearScheme) -> bool:
        """Whether this dialect stores ``scheme`` exactly."""
        return scheme in self.schemes
