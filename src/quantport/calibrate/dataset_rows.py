"""Rows of a calibration data set, streamed through the ``datasets`` library and shuffled in a bounded buffer.

Every source is opened with ``streaming=True`` (a Hub data set, or local files through the ``json`` /
``parquet`` / ``csv`` / ``text`` builders), so rows are read as they are consumed, never the whole file.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

from ..calibration_sources import CalibrationSource, LocalFiles, locate, require_datasets
from ..errors import CalibrationDataError

__all__ = ["open_rows", "shuffled"]

T = TypeVar("T")


def shuffled(items: Iterable[T], rng: random.Random, buffer_size: int) -> Iterator[T]:
    """``items`` in a random order drawn through a buffer of ``buffer_size``: each item yielded is taken at
    random from the buffer and replaced by the next item read, so at most ``buffer_size`` items are read
    ahead of those yielded. ``buffer_size`` 1 keeps the order."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = rng.randrange(buffer_size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _open_stream(
    source: CalibrationSource, local: LocalFiles | None, rng: random.Random
) -> Iterable[Mapping[str, Any]]:
    require_datasets()
    import datasets

    if local is None:
        try:
            return datasets.load_dataset(source.name, source.config_name, split=source.split, streaming=True)
        except Exception as exc:  # noqa: BLE001  (offline, unknown id, gated, bad split: one message for all)
            raise CalibrationDataError(
                f"calibration data set {source.name!r} is not a local file or directory, and it could not be "
                f"loaded from the Hugging Face Hub ({_short(exc)}); check the path or the id, the split "
                f"{source.split!r} and the network"
            ) from None
    files = [str(f) for f in local.files]
    rng.shuffle(files)  # a directory of shards is read from a seed-chosen file on
    try:
        return datasets.load_dataset(
            local.format.value, data_files={source.split: files}, split=source.split, streaming=True
        )
    except Exception as exc:  # noqa: BLE001
        raise CalibrationDataError(f"calibration data set {source.name} cannot be opened ({_short(exc)})") from None


def open_rows(source: CalibrationSource, rng: random.Random) -> Iterator[Mapping[str, Any]]:
    """The rows of ``source`` one by one, as they are read (a directory's files in an order drawn from
    ``rng``); a read error is a :class:`CalibrationDataError`."""
    stream = _open_stream(source, locate(source), rng)
    rows = iter(stream)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except CalibrationDataError:
            raise
        except Exception as exc:  # noqa: BLE001  (pyarrow / json / csv parse errors surface here)
            raise CalibrationDataError(
                f"calibration data set {source.name} cannot be read ({_short(exc)}); check that it is valid "
                "JSON lines, JSON, Parquet, CSV or UTF-8 text"
            ) from None
        yield row
