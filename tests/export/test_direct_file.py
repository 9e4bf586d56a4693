"""DirectFile: the same bytes as a plain file write, through O_DIRECT or the fallbacks."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from quantport.export import direct_file
from quantport.export.direct_file import ALIGNMENT, DirectFile


def _pieces() -> list[bytes | torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sizes = (7, 4096, 1, 20000, 0, 8192, 12345, 3)  # crossing the small test chunk in every way
    out: list[bytes | torch.Tensor] = [b"header-bytes"]
    for size in sizes:
        out.append(torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8))
    return out


def _expected(pieces) -> bytes:
    return b"".join(p if isinstance(p, bytes) else p.numpy().tobytes() for p in pieces)


def _write(path: Path, pieces, chunk: int = 2 * ALIGNMENT) -> DirectFile:
    with DirectFile(path, chunk=chunk) as handle:
        for piece in pieces:
            handle.write(piece)
    return handle


def test_bytes_and_length_are_exact(tmp_path):
    pieces = _pieces()
    handle = _write(tmp_path / "f.bin", pieces)
    assert (tmp_path / "f.bin").read_bytes() == _expected(pieces)
    assert handle.size == len(_expected(pieces))


def test_empty_file(tmp_path):
    _write(tmp_path / "empty.bin", [])
    assert (tmp_path / "empty.bin").read_bytes() == b""


def test_file_system_without_o_direct_gets_a_buffered_file(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_file.os, "open", no_direct)
    pieces = _pieces()
    handle = _write(tmp_path / "f.bin", pieces)
    assert not handle.direct
    assert (tmp_path / "f.bin").read_bytes() == _expected(pieces)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_o_direct_open_but_writes_refused_falls_back_before_any_byte(tmp_path, monkeypatch):
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def refuse_first(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_file.os, "pwrite", refuse_first)
    pieces = _pieces()
    handle = DirectFile(tmp_path / "f.bin", chunk=2 * ALIGNMENT)
    if not handle.direct:  # this file system refused O_DIRECT at open already
        handle.close()
        pytest.skip("the test directory's file system has no O_DIRECT")
    with handle:
        for piece in pieces:
            handle.write(piece)
    assert not handle.direct
    assert (tmp_path / "f.bin").read_bytes() == _expected(pieces)


def test_other_write_errors_propagate(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_file.os, "pwrite", full)
    with pytest.raises(OSError, match="No space"), DirectFile(tmp_path / "f.bin", chunk=ALIGNMENT) as handle:
        handle.write(torch.zeros(3 * ALIGNMENT, dtype=torch.uint8))


def test_platform_without_pwrite_writes_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.delattr(direct_file.os, "pwrite")
    pieces = _pieces()
    _write(tmp_path / "f.bin", pieces)
    assert (tmp_path / "f.bin").read_bytes() == _expected(pieces)
