"""Opening checkpoint files: regular files only, never blocking, with the problem named."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from ..errors import QuantportError

__all__ = ["UnreadableFileError", "open_regular", "require_regular_file"]


class UnreadableFileError(QuantportError, ValueError):
    """A checkpoint file that cannot be read: not a regular file, unreadable, or malformed.

    Attributes:
        path: the file (None when unknown).
        truncated: True when the file is shorter than its own contents say (an interrupted copy).
    """

    def __init__(self, message: str, *, path: Path | None = None, truncated: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.truncated = truncated

    def located(self) -> str:
        """``file: problem`` (the message alone when the file is unknown)."""
        return f"{self.path}: {self.message}" if self.path is not None else self.message


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "a special file"


def require_regular_file(path: Path, error: type[UnreadableFileError] = UnreadableFileError) -> os.stat_result:
    """``os.stat`` of ``path`` (symlinks followed); raises ``error`` unless it is a readable regular file."""
    try:
        info = path.stat()
    except OSError as exc:
        raise error(f"cannot be read: {exc.strerror or exc}", path=path) from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{_kind(info.st_mode)}, not a regular file", path=path)
    return info


def open_regular(path: Path, error: type[UnreadableFileError] = UnreadableFileError) -> tuple[BinaryIO, int]:
    """(binary handle, size) of regular file ``path``; never blocks on a FIFO or device.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor, so a file swapped
    for a FIFO between a ``stat`` and the ``open`` is refused too.
    """
    require_regular_file(path, error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"cannot be opened: {exc.strerror or exc}", path=path) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise error(f"{_kind(info.st_mode)}, not a regular file", path=path)
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), info.st_size
