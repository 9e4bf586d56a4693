"""Which dtypes of a batch of scale tensors are all clean, tested with a few torch operations per dtype.

"Clean" means that the per-tensor test of :mod:`.scales` finds nothing in any tensor of that dtype
(finite, and not negative; E8M0 never 255). The scale rule then reports nothing for them without
looking at each tensor, and runs the per-tensor test only on the dtypes of a batch that are not clean,
so its findings and messages are those of the per-tensor test alone.

E4M3 (``float8_e4m3fn``) is tested on its raw bytes: it has no infinity, its NaN is ``S.1111.111``
(``0x7F`` / ``0xFF``) and a byte above ``0x80`` is negative (``0x80`` is -0, which the per-tensor test
does not count as negative), so a clean byte is one of ``0x00``-``0x7E`` or ``0x80``.
"""

from __future__ import annotations

import torch

from ..tensor_batch import TensorBatch

__all__ = ["clean_dtypes", "e4m3_bytes_clean", "e8m0_bytes_clean", "floats_clean"]

E4M3_NAN = 0x7F
"""``0x7F`` (and ``0xFF``): the NaN of ``float8_e4m3fn``."""
E4M3_NEGATIVE_ZERO = 0x80
E8M0_NAN = 0xFF
_WIDE_FLOATS = ("F32", "F16", "BF16")
_CONVERTED_FLOATS = ("F64", "F8_E5M2")
"""Tested after the conversion to float32 that the per-tensor test makes (an F64 beyond float32's
range is infinite there)."""
_NO_VALUE_TEST = ("BOOL", "I8", "I16", "I32", "I64", "U16", "U32", "U64")
"""Dtypes the per-tensor test reads but never reports on (not floating point)."""


def e4m3_bytes_clean(raw: torch.Tensor) -> bool:
    """True when no byte of ``raw`` (uint8, E4M3 codes) is NaN (``0x7F``, ``0xFF``) or negative (``0x81``-``0xFE``).

    Read as int8, the clean codes are 0..126 and -128 (-0): one ``aminmax`` pass (no temporary the size
    of ``raw``) decides, unless a -0 is present, when the two byte tests decide.
    """
    if raw.numel() == 0:
        return True
    low, high = (int(v) for v in torch.aminmax(raw.view(torch.int8)))
    if high == E4M3_NAN or -E4M3_NEGATIVE_ZERO < low < 0:
        return False
    if low >= 0:
        return True
    return not bool(torch.logical_or(raw > E4M3_NEGATIVE_ZERO, raw == E4M3_NAN).any())


def e8m0_bytes_clean(raw: torch.Tensor) -> bool:
    """True when no byte of ``raw`` (uint8, E8M0 exponents) is 255, E8M0's NaN."""
    return raw.numel() == 0 or int(raw.max()) != E8M0_NAN


def floats_clean(values: torch.Tensor) -> bool:
    """True when every element of floating-point ``values`` is finite and not negative (-0 included)."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high)) and float(low) >= 0


def _clean(dtype: str, batch: TensorBatch) -> bool:
    if dtype in _NO_VALUE_TEST:
        return True
    raw = batch.buffers[dtype]
    if dtype == "F8_E4M3":
        return e4m3_bytes_clean(raw)
    if dtype in ("U8", "F8_E8M0"):
        return e8m0_bytes_clean(raw)
    if dtype in _WIDE_FLOATS:
        return floats_clean(batch.typed(dtype))
    if dtype in _CONVERTED_FLOATS:
        return floats_clean(batch.typed(dtype).to(torch.float32))
    return False


def clean_dtypes(batch: TensorBatch) -> frozenset[str]:
    """The safetensors dtypes of ``batch`` whose tensors the per-tensor scale test would find nothing in."""
    return frozenset(dtype for dtype in batch.buffers if _clean(dtype, batch))
