"""JSON files of a checkpoint (``config.json``, the shard index, ...), read in bounded memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import QuantportError
from .files import UnreadableFileError, open_regular

__all__ = ["MAX_JSON_BYTES", "JSONFileError", "StrictJSONError", "loads_strict", "read_json_object"]

MAX_JSON_BYTES = 100_000_000
"""The largest JSON file read (a shard index of a very large model is a few MB)."""


class JSONFileError(UnreadableFileError):
    """A JSON file of the checkpoint that cannot be read, or is not a JSON object."""


class StrictJSONError(QuantportError, ValueError):
    """Text that is not JSON, nests too deeply, repeats a key, or uses NaN / Infinity."""


def _reject_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not a JSON value")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StrictJSONError(f"duplicate key {key[:80]!r}")
        out[key] = value
    return out


def loads_strict(text: str, *, duplicates: bool = True) -> Any:
    """``json.loads`` that raises only :class:`StrictJSONError`: bad JSON, too deep, NaN (and
    repeated keys unless ``duplicates``)."""
    try:
        if duplicates:
            return json.loads(text)
        return json.loads(text, object_pairs_hook=_unique, parse_constant=_reject_constant)
    except RecursionError:
        raise StrictJSONError("nested too deeply") from None
    except StrictJSONError:
        raise
    except ValueError as exc:  # json.JSONDecodeError, and int literals too long to convert
        raise StrictJSONError(str(exc)) from None


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def read_json_object(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in file ``path``; :class:`JSONFileError` naming the problem otherwise.

    Only regular files are read, and only when they have at most ``max_bytes`` bytes.
    """
    path = Path(path)
    handle, size = open_regular(path, JSONFileError)
    with handle:
        if size > max_bytes:
            raise JSONFileError(f"{size} bytes, more than the {max_bytes}-byte limit for a JSON file", path=path)
        raw = handle.read(max_bytes + 1)
    try:
        data = loads_strict(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise JSONFileError(f"not valid UTF-8 (byte {exc.start})", path=path) from None
    except StrictJSONError as exc:
        raise JSONFileError(f"not valid JSON: {exc}", path=path) from None
    if not isinstance(data, dict):
        raise JSONFileError(f"a JSON {_json_type(data)}, not an object", path=path)
    return data
