"""Calibration data sets as typed options of :func:`quantport.quantize` (torch-free, for the command line).

A :class:`CalibrationSource` names one data set: a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` /
``.txt`` file, a directory of such files, or a Hugging Face Hub id (streamed). :class:`CalibrationData`
mixes several with weights and a seed. How rows become token ids is :mod:`quantport.calibrate.mixing`.

Example::

    from quantport.calibration_sources import CalibrationData, CalibrationSource

    chats = CalibrationSource("chats.jsonl", weight=0.7)
    wiki = CalibrationSource("wiki.parquet", weight=0.3)
    data = CalibrationData((chats, wiki))
    quantport.quantize(model, "nvfp4", data, calib_samples=128, calib_seq_len=1024)
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .errors import CalibrationDataError

__all__ = [
    "DATASETS_INSTALL",
    "CalibrationData",
    "CalibrationSource",
    "FileFormat",
    "LocalFiles",
    "locate",
    "require_datasets",
]

DATASETS_INSTALL = "pip install 'quantport[datasets]'"
"""The command that installs the optional ``datasets`` library."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class FileFormat(str, Enum):
    """A local file kind, named as the ``datasets`` builder that reads it."""

    JSON = "json"
    """One JSON object per line (``.jsonl``), or a JSON array or object of columns (``.json``)."""
    PARQUET = "parquet"
    """Apache Parquet, read one record batch at a time."""
    CSV = "csv"
    """Comma-separated values with a header row."""
    TEXT = "text"
    """Plain text: each line is a row whose ``text`` field is the line."""

    def __str__(self) -> str:
        return self.value


_SUFFIXES = {
    ".jsonl": FileFormat.JSON,
    ".json": FileFormat.JSON,
    ".parquet": FileFormat.PARQUET,
    ".csv": FileFormat.CSV,
    ".txt": FileFormat.TEXT,
    ".text": FileFormat.TEXT,
}
_KINDS = ", ".join(_SUFFIXES)


@dataclass(frozen=True)
class CalibrationSource:
    """One data set to calibrate on.

    Attributes:
        name: a local file or directory, or a Hugging Face Hub data set id (``org/name``).
        weight: its share of the calibration sequences, relative to the other sources' weights.
        split: the split to read (a local source's files form this split).
        text_field: the field holding plain text (``"text"`` when None).
        messages_field: the field holding a chat, a list of ``{"role", "content"}``, rendered with the
            tokenizer's chat template; when None, a ``messages`` field is used where the rows have one.
        config_name: the Hub data set's configuration (subset), e.g. ``"en"`` for ``allenai/c4``.
    """

    name: str
    weight: float = 1.0
    split: str = "train"
    text_field: str | None = None
    messages_field: str | None = None
    config_name: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise CalibrationDataError("a calibration data set needs a name: a local file, directory or hub id")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise CalibrationDataError(
                f"calibration data set {self.name}: weight {self.weight} is not a positive number"
            )
        if self.text_field is not None and self.messages_field is not None:
            raise CalibrationDataError(
                f"calibration data set {self.name}: give a text field or a messages field, not both"
            )


@dataclass(frozen=True)
class CalibrationData:
    """Data sets mixed into one calibration set.

    Each source gets a share of the calibration sequences in proportion to its weight; its rows are
    drawn through a shuffle buffer of ``shuffle_buffer`` rows (as the ``datasets`` library shuffles a
    stream), so a source is read only as far as calibration needs, plus that buffer. The sequences
    of all sources are then shuffled together. Everything is decided by ``seed``: the same seed gives
    the same token ids.

    Attributes:
        sources: one or more :class:`CalibrationSource`.
        seed: seed of every shuffle (file order, rows, sequences).
        shuffle_buffer: rows held for shuffling per source; 1 reads the rows in their order.
    """

    sources: tuple[CalibrationSource, ...]
    seed: int = 0
    shuffle_buffer: int = field(default=1024)

    def __post_init__(self) -> None:
        sources = (self.sources,) if isinstance(self.sources, CalibrationSource) else tuple(self.sources)
        if not sources or not all(isinstance(s, CalibrationSource) for s in sources):
            raise CalibrationDataError("CalibrationData needs one or more CalibrationSource")
        object.__setattr__(self, "sources", sources)
        if self.shuffle_buffer < 1:
            raise CalibrationDataError(f"shuffle_buffer must be 1 or more, got {self.shuffle_buffer}")

    @classmethod
    def from_names(
        cls, names: Sequence[str], weights: Sequence[float] = (), **source_options: str | None
    ) -> CalibrationData:
        """Sources named by path or hub id with the same ``split`` / field options; ``weights`` is empty
        (equal shares) or has one weight per name."""
        if weights and len(weights) != len(names):
            raise CalibrationDataError(
                f"{len(weights)} calibration weight(s) for {len(names)} data set(s); give one weight per data set"
            )
        shares = weights or [1.0] * len(names)
        options = {key: value for key, value in source_options.items() if value is not None}
        return cls(tuple(CalibrationSource(n, weight=w, **options) for n, w in zip(names, shares, strict=True)))


@dataclass(frozen=True)
class LocalFiles:
    """The files of a local source, in name order, all of one :class:`FileFormat`."""

    format: FileFormat
    files: tuple[Path, ...]


def _file_format(path: Path, name: str) -> FileFormat:
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise CalibrationDataError(
            f"calibration data set {name}: unknown file type {path.suffix or '(no suffix)'!r}; give {_KINDS} files"
        )
    return kind


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "~", "/"))
        or "\\" in name
        or Path(name).suffix.lower() in _SUFFIXES
        or _HUB_ID.fullmatch(name) is None
    )


def locate(source: CalibrationSource) -> LocalFiles | None:
    """The local files of ``source``, or None when its name is a hub id; raises
    :class:`CalibrationDataError` for a path that does not exist or holds no data file."""
    path = Path(source.name).expanduser()
    if path.is_file():
        return LocalFiles(_file_format(path, source.name), (path,))
    if path.is_dir():
        files = sorted(
            f
            for f in path.rglob("*")
            if f.is_file()
            and f.suffix.lower() in _SUFFIXES
            and not any(p.startswith(".") for p in f.relative_to(path).parts)
        )
        if not files:
            raise CalibrationDataError(f"calibration data set {source.name} is a directory without {_KINDS} files")
        kinds = sorted({_SUFFIXES[f.suffix.lower()].value for f in files})
        if len(kinds) > 1:
            raise CalibrationDataError(
                f"calibration data set {source.name} mixes file kinds ({', '.join(kinds)}); give each kind "
                "as its own data set"
            )
        return LocalFiles(FileFormat(kinds[0]), tuple(files))
    if path.exists():
        raise CalibrationDataError(f"calibration data set {source.name} is not a regular file or directory")
    if _looks_like_path(source.name):
        raise CalibrationDataError(
            f"calibration data set {source.name} does not exist; give a {_KINDS} file, a directory of them "
            "or a Hugging Face Hub data set id"
        )
    return None


def require_datasets() -> None:
    """Raise :class:`CalibrationDataError` naming the install command when ``datasets`` is not installed."""
    if importlib.util.find_spec("datasets") is None:
        raise CalibrationDataError(
            f"calibrating on a data set needs the Hugging Face datasets library; install it with {DATASETS_INSTALL}"
        )
