"""What every checkpoint dialect is: its name, the schemes it stores exactly, and its content builder.

The names are :class:`~quantport.dialects.ExportFormat`; the package collects every module's ``TARGET``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import ExportError
from ...recipes import LinearScheme

if TYPE_CHECKING:
    from torch import nn

    from ...dialects import ExportFormat
    from ...state import QuantizationState
    from ..content import CheckpointContent

__all__ = ["Target", "UnsupportedFormatError"]


class UnsupportedFormatError(ExportError):
    """A recipe or scheme has no form in the requested checkpoint format."""


@dataclass(frozen=True, slots=True)
class Target:
    """One checkpoint dialect.

    Attributes:
        format: its name.
        priority: its rank among the dialects that store a scheme (lowest: the scheme's default format).
        schemes: the Linear schemes whose numerics it stores exactly and an engine reads.
        content: (quantized model, its state) -> the tensors, ``quantization_config`` and side files; it may
            refuse the model with an :class:`UnsupportedFormatError` before anything is written.
    """

    format: ExportFormat
    priority: int
    schemes: frozenset[LinearScheme]
    content: Callable[[nn.Module, QuantizationState], CheckpointContent]

    def accepts(self, scheme: LinearScheme) -> bool:
        """Whether this dialect stores ``scheme`` exactly."""
        return scheme in self.schemes
