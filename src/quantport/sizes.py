"""Byte sizes as users write them (``--max-shard-size 5GB``); no torch import, so the CLI checks them first."""

from __future__ import annotations

__all__ = ["parse_size"]

_SIZE_UNITS = {
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "B": 1,
}


def parse_size(size: int | str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1.5GB"`` or a number of bytes -> bytes (> 0).

    Raises ``ValueError`` for anything else.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        number = size
    else:
        text = str(size).strip().upper()
        factor = next((f for unit, f in _SIZE_UNITS.items() if text.endswith(unit)), 1)
        digits = next((text[: -len(unit)] for unit in _SIZE_UNITS if text.endswith(unit)), text).strip()
        try:
            number = int(float(digits) * factor)
        except (ValueError, OverflowError):
            raise ValueError(f"{size!r} is not a size; use e.g. 5GB, 500MB, 2GiB or a number of bytes") from None
    if number < 1:
        raise ValueError(f"{size!r} is not a positive size; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    return number
