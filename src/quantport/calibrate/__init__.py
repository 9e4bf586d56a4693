"""Calibration: data, the forward loop, and the statistics it records."""

from .data import bundled_calibration_text, calibration_batches
from .loop import run_calibration

__all__ = ["bundled_calibration_text", "calibration_batches", "run_calibration"]
