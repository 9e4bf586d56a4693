"""A write-only checkpoint file: with ``O_DIRECT``, through the page cache, or measuring which is faster.

:class:`DirectPolicy` picks the way. ``ALWAYS``: every chunk goes out with ``O_DIRECT`` from the aligned
buffers, so the fsync at the end of an export has no page-cache backlog to flush (on an H200 host, 9.5 s of
a 27 s export went to that fsync when most chunks took the page cache). ``NEVER``: the page cache only
(small files, where an aligned direct write of a few kilobytes costs more than it saves).

``ADAPTIVE`` measures. Why both: a write into the page cache returns once the bytes are in memory (the kernel
writes them to disk later), which is the fastest way out while free memory is cheap to take, and leaves the
file cached for an engine that loads it next. It stops being cheap when the kernel must throttle writers (more
dirty data than it allows) or, on virtual machines that hand free memory back to the host, when every fresh
page costs a host fault (0.56 GB: 0.12 s into memory freed moments ago, 1.3 s into returned memory, 0.29 s
with ``O_DIRECT`` either way, on the machine of ``bench/RESULTS.md``). So the file measures: its first full
chunk goes out with ``O_DIRECT``, the following ones through the page cache while each is written at least as
fast as that probe; the first slower one switches the rest of the file to ``O_DIRECT`` (:class:`WriteRoute`).
``O_DIRECT`` needs block-aligned buffers, offsets and lengths, so bytes are gathered in aligned buffers and
written in aligned chunks; a last ``O_DIRECT`` chunk is padded and the file truncated to its true length. File
systems without ``O_DIRECT`` (tmpfs, some network file systems) get page-cache writes only. The bytes are the
same whichever way they go.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

__all__ = ["CheckpointFile", "DirectPolicy", "WriteMode", "WriteRoute"]

logger = logging.getLogger(__name__)

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
ALIGNMENT = 4096  # a multiple of every logical block size in use
CHUNK = 8 << 20  # bytes per write call; two such buffers per open file


class WriteMode(str, Enum):
    """How one chunk reaches the file."""

    CACHED = "cached"
    """Through the page cache: done once the bytes are in memory; the kernel writes them out later."""
    DIRECT = "direct"
    """``O_DIRECT``: done once the device has the bytes; aligned buffer, offset and length."""


class DirectPolicy(str, Enum):
    """When a file's chunks go out with ``O_DIRECT`` (where the file system takes it; else the page cache)."""

    ALWAYS = "always"
    """Every chunk, the padded tail included: nothing of the file waits in the page cache for an fsync."""
    ADAPTIVE = "adaptive"
    """The first full chunk probes ``O_DIRECT``; the page cache while it is at least as fast (:class:`WriteRoute`)."""
    NEVER = "never"
    """The page cache only (``O_DIRECT`` is not even opened)."""


@dataclass
class WriteRoute:
    """Chooses each chunk's :class:`WriteMode` from how fast earlier full chunks went.

    The first chunk probes ``O_DIRECT``; then the page cache is used while every chunk written through
    it is at least as fast as the fastest direct chunk; after the first slower one (fresh memory is
    expensive, or the kernel throttles dirty data) every remaining chunk is direct.
    """

    direct_allowed: bool = True
    policy: DirectPolicy = DirectPolicy.ADAPTIVE
    direct_rate: float | None = None  # bytes per second of the fastest direct chunk
    settled_direct: bool = False
    history: list[tuple[WriteMode, int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy is DirectPolicy.NEVER:
            self.direct_allowed = False

    def next_mode(self) -> WriteMode:
        if not self.direct_allowed:
            return WriteMode.CACHED
        if self.policy is DirectPolicy.ALWAYS:
            return WriteMode.DIRECT
        if self.settled_direct or self.direct_rate is None:
            return WriteMode.DIRECT
        return WriteMode.CACHED

    def observe(self, mode: WriteMode, nbytes: int, seconds: float) -> None:
        """Record one full chunk written ``mode`` in ``seconds``."""
        self.history.append((mode, nbytes, seconds))
        if self.policy is not DirectPolicy.ADAPTIVE:
            return
        rate = nbytes / max(seconds, 1e-9)
        if mode is WriteMode.DIRECT:
            self.direct_rate = max(rate, self.direct_rate or 0.0)
        elif self.direct_rate is not None and rate < self.direct_rate:
            self.settled_direct = True
            logger.debug(
                "page-cache writes at %.2f GB/s, O_DIRECT at %.2f GB/s: O_DIRECT from here on",
                rate / 1e9,
                self.direct_rate / 1e9,
            )

    def refuse_direct(self) -> None:
        """The file system refuses ``O_DIRECT``: page cache only."""
        self.direct_allowed = False


class CheckpointFile:
    """``write(bytes or uint8 tensor)`` appends; ``close()`` finishes the file.

    Double-buffered: the caller's thread copies into one aligned buffer while an I/O thread writes the
    other, so copying and the disk overlap. One caller thread only (quantport's writer thread). ``policy``
    (:class:`DirectPolicy`) is used when no ``route`` is given.
    """

    def __init__(
        self,
        path: Path,
        chunk: int = CHUNK,
        route: WriteRoute | None = None,
        pinned: bool = False,
        policy: DirectPolicy = DirectPolicy.ADAPTIVE,
    ) -> None:
        self.path = Path(path)
        self.size = 0
        self.route = route or WriteRoute(policy=policy)
        self._chunk = chunk
        self._fd = os.open(self.path, _FLAGS, 0o644)
        self._direct_fd = -1
        if self.route.direct_allowed and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError as error:  # EINVAL: this file system has no O_DIRECT (tmpfs)
                logger.debug("%s: O_DIRECT refused (%s); writing through the page cache", self.path, error)
        if self._direct_fd < 0:
            self.route.refuse_direct()
        self._maps: list[mmap.mmap] = []
        self._buffers = _pinned_buffers(chunk) if pinned else None
        if self._buffers is None:
            self._maps = [mmap.mmap(-1, chunk) for _ in range(2)]  # anonymous maps are page aligned
            self._buffers = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self._views = [memoryview(b.numpy()) for b in self._buffers]
        self._pending: list[Future | None] = [None, None]
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantport-io")
        self._current = 0
        self._used = 0
        self._offset = 0  # file offset of the current buffer's first byte

    def write(self, data: bytes | torch.Tensor, tap: Callable[[memoryview], object] | None = None) -> None:
        """Append ``data`` (bytes, or a contiguous flat uint8 tensor on the CPU or a GPU: a GPU tensor is
        copied straight into the buffer, one device-to-host copy, with no host copy in between).

        ``tap`` is called with each piece of the host buffer the bytes were copied into, in order (the very
        bytes the file gets; a view valid only during the call)."""
        source = torch.frombuffer(bytearray(data), dtype=torch.uint8) if isinstance(data, bytes) else data
        n, done = source.numel(), 0
        self.size += n
        while done < n:
            buffer = self._buffers[self._current]
            take = min(n - done, buffer.numel() - self._used)
            buffer[self._used : self._used + take].copy_(source[done : done + take])
            if tap is not None:
                with self._views[self._current][self._used : self._used + take] as piece:
                    tap(piece)
            self._used += take
            done += take
            if self._used == buffer.numel():
                self._submit(self._used, self.route.next_mode())

    def _submit(self, length: int, mode: WriteMode) -> None:
        """Hand the current buffer to the I/O thread and switch to the other one (once it is written)."""
        self._pending[self._current] = self._io.submit(self._write_at, self._current, length, self._offset, mode)
        self._offset += length
        self._current ^= 1
        self._used = 0
        pending = self._pending[self._current]
        if pending is not None:
            self._pending[self._current] = None
            pending.result()

    def _write_at(self, index: int, length: int, offset: int, mode: WriteMode) -> None:
        if mode is WriteMode.DIRECT and self._direct_fd < 0:  # refused after this chunk was routed
            mode = WriteMode.CACHED
        started = time.perf_counter()
        with self._views[index][:length] as view:
            written = 0
            while written < length:
                fd = self._direct_fd if mode is WriteMode.DIRECT else self._fd
                try:
                    written += _pwrite(fd, view[written:], offset + written)
                except OSError as error:
                    if not (mode is WriteMode.DIRECT and error.errno == errno.EINVAL and written == 0):
                        raise
                    self._refuse_direct()  # opened with O_DIRECT, but the file system refuses its writes
                    mode = WriteMode.CACHED
        if length == self._chunk:
            self.route.observe(mode, length, time.perf_counter() - started)

    def _refuse_direct(self) -> None:
        logger.debug("%s: O_DIRECT writes refused; writing through the page cache", self.path)
        os.close(self._direct_fd)
        self._direct_fd = -1
        self.route.refuse_direct()

    def close(self, *, finish: bool = True) -> None:
        """Write what is left and set the true length; ``finish=False`` (after an error) only releases the
        file and the buffers."""
        if self._fd < 0:
            return
        try:
            if finish:
                self._finish()
        finally:
            self._io.shutdown(wait=True)
            for fd in (self._fd, self._direct_fd):
                if fd >= 0:
                    os.close(fd)
            self._fd = self._direct_fd = -1
            for view in self._views:
                view.release()
            del self._buffers, self._views
            for m in self._maps:
                with contextlib.suppress(BufferError):  # a view still held by a traceback: freed with it
                    m.close()

    def _finish(self) -> None:
        if self._used:
            tail = self._used
            mode = self.route.next_mode()
            padded = -(-tail // ALIGNMENT) * ALIGNMENT if mode is WriteMode.DIRECT else tail
            self._buffers[self._current][tail:padded].zero_()
            self._submit(padded, mode)
        for index, pending in enumerate(self._pending):
            if pending is not None:
                self._pending[index] = None
                pending.result()
        os.ftruncate(self._fd, self.size)  # drop the padding of a last direct chunk

    def __enter__(self) -> CheckpointFile:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(finish=exc_type is None)


def _pinned_buffers(chunk: int) -> list[torch.Tensor] | None:
    """Two page-locked, ``ALIGNMENT``-aligned buffers the GPU copies into at full speed (a copy into
    pageable memory goes through a driver staging buffer), or None when page-locked memory cannot be had.
    torch's pinned allocator does not promise the alignment ``O_DIRECT`` needs, so each buffer is an aligned
    slice of a slightly larger allocation."""
    buffers = []
    for _ in range(2):
        try:
            raw = torch.empty(chunk + ALIGNMENT, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            return None
        start = -raw.data_ptr() % ALIGNMENT
        buffers.append(raw[start : start + chunk])
    return buffers


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    """``os.pwrite``; where it is missing (Windows), a seek and a write (one I/O thread per file)."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)
