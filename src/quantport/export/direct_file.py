"""A write-only file that bypasses the page cache (``O_DIRECT``) where the file system allows it.

Why: a checkpoint is written once and not read back by this process. Through the page cache every
written byte first needs a free page of memory; on a virtual machine whose free memory goes back to
the host, taking those pages again costs more than the disk write itself (0.56 GB: 1.3 s into
returned memory, 0.1 s into memory just freed, 0.24 s with ``O_DIRECT`` either way, on the machine
of ``bench/RESULTS.md``), and on any machine a large export fills the page cache with bytes nobody
reads. ``O_DIRECT`` needs block-aligned buffers, offsets and lengths, so bytes are gathered in an
aligned buffer and written in large aligned chunks; the last chunk is padded and the file truncated
to its true length. File systems without ``O_DIRECT`` (tmpfs, some network file systems) get an
ordinary buffered file, with the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["DirectFile"]

logger = logging.getLogger(__name__)

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
ALIGNMENT = 4096  # a multiple of every logical block size in use
CHUNK = 8 << 20  # bytes per write call; two such buffers per open file


class DirectFile:
    """``write(bytes or uint8 tensor)`` appends; ``close()`` finishes the file.

    Double-buffered: the caller's thread copies into one aligned buffer while an I/O thread writes
    the other, so copying and the disk overlap. One caller thread only (quantport's writer thread).
    """

    def __init__(self, path: Path, chunk: int = CHUNK) -> None:
        self.path = Path(path)
        self.size = 0
        self._fd = -1
        self._direct = hasattr(os, "O_DIRECT")
        if self._direct:
            try:
                self._fd = os.open(self.path, _FLAGS | os.O_DIRECT, 0o644)
            except OSError:  # EINVAL: this file system has no O_DIRECT
                self._direct = False
        if not self._direct:
            self._fd = os.open(self.path, _FLAGS, 0o644)
        self._maps = [mmap.mmap(-1, chunk) for _ in range(2)]  # anonymous maps are page aligned
        self._buffers = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self._pending: list[Future | None] = [None, None]
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantport-io")
        self._current = 0
        self._used = 0
        self._offset = 0  # file offset of the current buffer's first byte

    @property
    def direct(self) -> bool:
        return self._direct

    def write(self, data: bytes | torch.Tensor) -> None:
        """Append ``data`` (bytes, or a contiguous uint8 CPU tensor)."""
        source = torch.frombuffer(bytearray(data), dtype=torch.uint8) if isinstance(data, bytes) else data
        n, done = source.numel(), 0
        self.size += n
        while done < n:
            buffer = self._buffers[self._current]
            take = min(n - done, buffer.numel() - self._used)
            buffer[self._used : self._used + take].copy_(source[done : done + take])
            self._used += take
            done += take
            if self._used == buffer.numel():
                self._submit(self._used)

    def _submit(self, length: int) -> None:
        """Hand the current buffer to the I/O thread and switch to the other one (once it is written)."""
        self._pending[self._current] = self._io.submit(self._write_at, self._current, length, self._offset)
        self._offset += length
        self._current ^= 1
        self._used = 0
        pending = self._pending[self._current]
        if pending is not None:
            self._pending[self._current] = None
            pending.result()

    def _write_at(self, index: int, length: int, offset: int) -> None:
        with memoryview(self._maps[index])[:length] as view:
            written = 0
            while written < length:
                try:
                    written += _pwrite(self._fd, view[written:], offset + written)
                except OSError as error:
                    if not (self._direct and error.errno == errno.EINVAL and offset == 0 and written == 0):
                        raise
                    self._reopen_buffered()  # opened with O_DIRECT, but the file system refuses its writes

    def _reopen_buffered(self) -> None:
        logger.debug("%s: O_DIRECT writes refused; writing through the page cache", self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, _FLAGS, 0o644)
        self._direct = False

    def close(self, *, finish: bool = True) -> None:
        """Write what is left (padded to the alignment under ``O_DIRECT``) and set the true length;
        ``finish=False`` (after an error) only releases the file and the buffers."""
        if self._fd < 0:
            return
        try:
            if finish:
                self._finish()
        finally:
            self._io.shutdown(wait=True)
            os.close(self._fd)
            self._fd = -1
            del self._buffers
            for m in self._maps:
                with contextlib.suppress(BufferError):  # a view still held by a traceback: freed with it
                    m.close()

    def _finish(self) -> None:
        if self._used:
            tail = self._used
            padded = -(-tail // ALIGNMENT) * ALIGNMENT if self._direct else tail
            self._buffers[self._current][tail:padded].zero_()
            self._submit(padded)
        for index, pending in enumerate(self._pending):
            if pending is not None:
                self._pending[index] = None
                pending.result()
        os.ftruncate(self._fd, self.size)  # drop the padding (also if O_DIRECT was given up meanwhile)

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(finish=exc_type is None)


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    """``os.pwrite``; where it is missing (Windows), a seek and a write (one I/O thread per file)."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)
