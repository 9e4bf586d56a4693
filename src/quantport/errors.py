"""Exceptions a user can act on. Every message names the problem and the fix."""

from __future__ import annotations

__all__ = [
    "CalibrationDataError",
    "ExportError",
    "InvalidWeightsError",
    "ModelLoadError",
    "OutputExistsError",
    "QuantportError",
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
