"""File-system steps that must not lose data: fsync, a rename that never replaces, OS errors as user errors.

``rename_noreplace`` is Linux ``renameat2(RENAME_NOREPLACE)`` (glibc 2.28+, through ctypes): the rename fails
with ``EEXIST`` instead of replacing whatever is at the destination. Where it is missing (other systems, old
libc, file systems that refuse the flag) it falls back to "check, then ``os.rename``", which has a window of
microseconds in which a directory created at the destination could still be replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import OutputWriteError

__all__ = ["fsync_directory", "fsync_tree", "os_error", "rename_noreplace", "signals_deferred"]

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1

FIXES: dict[int, str] = {
    errno.ENOSPC: "free space on that file system or choose an OUT on another one",
    errno.EDQUOT: "free space within your disk quota or choose an OUT on another file system",
    errno.EROFS: "the file system is read-only; choose an OUT on a writable file system",
    errno.EACCES: "choose an OUT you may write to, or fix the permissions of its parent directory",
    errno.EPERM: "choose an OUT you may write to, or fix the permissions of its parent directory",
    errno.ENAMETOOLONG: "choose a shorter OUT (at most 255 bytes per name and 4096 per path)",
    errno.ENOTDIR: "a parent of OUT is a file, not a directory; choose another OUT",
    errno.EIO: "the device reported an I/O error; check the disk and choose an OUT on a healthy one",
}
"""Per ``errno``: what the user can do about it."""


def os_error(what: str, error: OSError) -> OutputWriteError:
    """One-line :class:`OutputWriteError`: ``what``, the OS reason, the path it names and the fix."""
    reason = error.strerror or (os.strerror(error.errno) if error.errno else str(error))
    where = f" ({error.filename})" if error.filename else ""
    fix = FIXES.get(error.errno or 0, "check the output location, or choose another OUT")
    return OutputWriteError(f"{what}: {reason}{where}; {fix}")


def _load_renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


RENAMEAT2 = _load_renameat2()


def rename_noreplace(source: Path, destination: Path) -> bool:
    """Rename ``source`` to ``destination`` unless something is there; False (and nothing renamed) if it is."""
    if RENAMEAT2 is not None:
        if RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), _RENAME_NOREPLACE) == 0:
            return True
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            return False
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # EINVAL: this file system lacks the flag
            raise OSError(code, os.strerror(code), str(destination))
    if os.path.lexists(destination):  # os.rename would silently replace an empty directory
        return False
    os.rename(source, destination)
    return True


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Make the entries of directory ``path`` (names created, renamed or removed) durable."""
    with contextlib.suppress(IsADirectoryError, PermissionError):  # systems that cannot open directories
        _fsync(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (and ``root``), files first, so that a rename of ``root``
    that survives a power loss names complete files."""

    def fail(error: OSError) -> None:
        raise error

    for directory, _, files in os.walk(root, topdown=False, onerror=fail):
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                _fsync(path, os.O_RDONLY)
        fsync_directory(Path(directory))


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the body runs (a swap of directories that must not stop half way); a
    signal that arrived is delivered, to the handler that was in place, when the body is done.

    Only in the main thread (where Python runs signal handlers); elsewhere the body just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, object] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) not in (signal.SIG_IGN, None):
            previous[signum] = signal.signal(signum, lambda number, _frame: caught.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])
