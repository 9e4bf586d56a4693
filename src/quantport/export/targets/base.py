"""What every checkpoint dialect is: its name, the schemes it stores exactly, and its content builder.

The names (:class:`~quantport.export.targets.ExportFormat`) and the registry live in the package."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import ExportError
from ...recipes import LinearScheme

if TYPE_CHECKING:
    from torch import nn

    from ...state import QuantizationState
    from ..content import CheckpointContent
    from . import ExportFormat

__all__ = ["Target", "UnsupportedFormatError"]


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
