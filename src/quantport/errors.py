"""Exceptions a user can act on. Every message names the problem and the fix."""

from __future__ import annotations

__all__ = [
    "AlreadyQuantizedError",
    "CalibrationDataError",
    "DistributedRunError",
    "ExportError",
    "InterruptedBySignal",
    "InvalidActivationsError",
    "InvalidArgumentError",
    "InvalidWeightsError",
    "MissingWeightsError",
    "ModelLoadError",
    "OutputChangedError",
    "OutputExistsError",
    "OutputPathError",
    "OutputWriteError",
    "QuantportError",
    "UnsupportedExpertsError",
]


class QuantportError(Exception):
    """Base class of quantport's errors."""


class ModelLoadError(QuantportError):
    """The model could not be found or read."""


class InvalidWeightsError(QuantportError):
    """The model's weights cannot be quantized (NaN or infinite values)."""


class CalibrationDataError(QuantportError):
    """Calibration data is missing or unusable."""


class ExportError(QuantportError):
    """The model cannot be exported as asked."""


class OutputExistsError(ExportError):
    """The output directory exists and is not empty."""


class OutputPathError(ExportError):
    """The output directory may not be used: it is (or contains) the model or the current directory, or a mount
    point."""


class OutputWriteError(ExportError):
    """The operating system refused to create or write the output (disk full, read-only, permission, name too
    long)."""


class OutputChangedError(ExportError):
    """The output directory changed while quantport was writing (created, replaced or filled by someone else)."""


class InterruptedBySignal(KeyboardInterrupt):
    """SIGTERM (or another signal) stopped the run; handled like Ctrl-C, which raises ``KeyboardInterrupt``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class InvalidArgumentError(QuantportError):
    """A command-line argument or API option has a value quantport cannot use (the message names it)."""


class MissingWeightsError(ModelLoadError):
    """The checkpoint does not hold every parameter of the model (transformers would fill them randomly)."""


class AlreadyQuantizedError(QuantportError):
    """The model (object or checkpoint) is already quantized; quantport quantizes full-precision models only."""


class InvalidActivationsError(QuantportError):
    """Calibration produced NaN or infinite activation statistics."""


class UnsupportedExpertsError(QuantportError):
    """An experts module that no :class:`~quantport.arch.experts.ExpertLayout` describes and structural
    detection cannot classify."""


class DistributedRunError(QuantportError):
    """A rank of a torch.distributed run failed or stopped answering; every rank raises the same message."""
