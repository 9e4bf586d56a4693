"""CheckpointFile: the same bytes as a plain file write, whichever way each chunk goes; WriteRoute's choices."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from quantport.export import checkpoint_file
from quantport.export.checkpoint_file import ALIGNMENT, CheckpointFile, WriteMode, WriteRoute

CHUNK = 2 * ALIGNMENT
CACHED, DIRECT = WriteMode.CACHED, WriteMode.DIRECT
has_o_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


def _pieces() -> list[bytes | torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sizes = (7, 4096, 1, 20000, 0, 8192, 12345, 3)  # crossing the small test chunk in every way
    out: list[bytes | torch.Tensor] = [b"header-bytes"]
    for size in sizes:
        out.append(torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8))
    return out


def _expected(pieces) -> bytes:
    return b"".join(p if isinstance(p, bytes) else p.numpy().tobytes() for p in pieces)


def _write(path: Path, pieces, route: WriteRoute | None = None) -> CheckpointFile:
    with CheckpointFile(path, chunk=CHUNK, route=route) as handle:
        for piece in pieces:
            handle.write(piece)
    return handle


class ScriptedRoute(WriteRoute):
    """Takes the modes it is given, in order (the last one repeats), and records every observation."""

    def __init__(self, modes: list[WriteMode]) -> None:
        super().__init__()
        self.modes = list(modes)

    def next_mode(self) -> WriteMode:
        if not self.direct_allowed:
            return CACHED
        return self.modes.pop(0) if len(self.modes) > 1 else self.modes[0]


def _direct_works(tmp_path) -> bool:
    handle = CheckpointFile(tmp_path / "probe.bin", chunk=CHUNK)
    handle.close()
    return handle.route.direct_allowed


@pytest.mark.parametrize(
    "modes",
    [[CACHED], [DIRECT], [DIRECT, CACHED, CACHED, DIRECT], [CACHED, DIRECT, CACHED], [DIRECT, CACHED]],
    ids=["cached", "direct", "probe-then-switch", "alternating", "direct-tail-cached"],
)
def test_bytes_and_length_are_exact_whichever_way_chunks_go(tmp_path, modes):
    pieces = _pieces()
    handle = _write(tmp_path / "f.bin", pieces, ScriptedRoute(modes))
    assert (tmp_path / "f.bin").read_bytes() == _expected(pieces)
    assert handle.size == len(_expected(pieces))
    if handle.route.direct_allowed:
        assert [mode for mode, _, _ in handle.route.history] == (modes + [modes[-1]] * 10)[: len(handle.route.history)]


def test_default_route_writes_exact_bytes_and_observes_full_chunks_only(tmp_path):
    pieces = _pieces()
    handle = _write(tmp_path / "f.bin", pieces)
    assert (tmp_path / "f.bin").read_bytes() == _expected(pieces)
    full_chunks = len(_expected(pieces)) // CHUNK
    assert len(handle.route.history) == full_chunks
    assert all(n == CHUNK for _, n, _ in handle.route.history)


def test_empty_file(tmp_path):
    _write(tmp_path / "empty.bin", [])
    assert (tmp_path / "empty.bin").read_bytes() == b""


def test_route_probes_direct_then_keeps_the_page_cache_while_it_is_faster():
    route = WriteRoute()
    assert route.next_mode() is DIRECT
    route.observe(DIRECT, 8, 4.0)  # 2 bytes/s
    assert route.next_mode() is CACHED
    route.observe(CACHED, 8, 1.0)  # 8 bytes/s: faster, stay
    route.observe(CACHED, 8, 2.0)
    assert route.next_mode() is CACHED
    route.observe(CACHED, 8, 8.0)  # 1 byte/s: slower than the probe (fresh memory, throttling)
    assert route.next_mode() is DIRECT
    route.observe(DIRECT, 8, 100.0)  # a slow direct chunk does not bring the page cache back
    assert route.next_mode() is DIRECT


def test_route_without_o_direct_always_uses_the_page_cache():
    route = WriteRoute()
    route.refuse_direct()
    assert route.next_mode() is CACHED
    route.observe(CACHED, 8, 1000.0)
    assert route.next_mode() is CACHED


def test_file_system_without_o_direct_gets_page_cache_writes(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(checkpoint_file.os, "open", no_direct)
    pieces = _pieces()
    handle = _write(tmp_path / "f.bin", pieces)
    assert not handle.route.direct_allowed
    assert {mode for mode, _, _ in handle.route.history} == {CACHED}
    assert (tmp_path / "f.bin").read_bytes() == _expected(pieces)


@has_o_direct
def test_o_direct_open_but_writes_refused_falls_back_before_any_byte(tmp_path, monkeypatch):
    if not _direct_works(tmp_path):
        pytest.skip("the test directory's file system has no O_DIRECT")
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def refuse_first(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(checkpoint_file.os, "pwrite", refuse_first)
    pieces = _pieces()
    handle = _write(tmp_path / "f.bin", pieces)
    assert not handle.route.direct_allowed
    assert (tmp_path / "f.bin").read_bytes() == _expected(pieces)


def test_other_write_errors_propagate(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_file.os, "pwrite", full)
    with pytest.raises(OSError, match="No space"), CheckpointFile(tmp_path / "f.bin", chunk=ALIGNMENT) as handle:
        handle.write(torch.zeros(3 * ALIGNMENT, dtype=torch.uint8))


def test_platform_without_pwrite_writes_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.delattr(checkpoint_file.os, "pwrite")
    pieces = _pieces()
    _write(tmp_path / "f.bin", pieces, ScriptedRoute([DIRECT, CACHED]))
    assert (tmp_path / "f.bin").read_bytes() == _expected(pieces)


def _payload(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64).remainder(251).to(torch.uint8)


def test_pinned_buffers_fall_back_to_maps_where_they_cannot_be_had(tmp_path, monkeypatch):
    def no_pinned_memory(*args, **kwargs):
        raise RuntimeError("no CUDA driver")

    monkeypatch.setattr(checkpoint_file.torch, "empty", no_pinned_memory)
    data = _payload(3 * ALIGNMENT + 17)
    with CheckpointFile(tmp_path / "f", chunk=ALIGNMENT, pinned=True) as handle:
        assert handle._maps  # the anonymous maps, not pinned tensors
        handle.write(data)
    assert (tmp_path / "f").read_bytes() == bytes(data.tolist())


def test_pinned_buffers_are_aligned_slices_whatever_the_allocator_returns(monkeypatch):
    backing = torch.zeros(3 * ALIGNMENT, dtype=torch.uint8)
    misaligned = backing[8:]  # an allocation 8 bytes past a page boundary

    monkeypatch.setattr(checkpoint_file.torch, "empty", lambda size, **kwargs: misaligned[:size])
    buffers = checkpoint_file._pinned_buffers(ALIGNMENT)
    assert buffers is not None and len(buffers) == 2
    for buffer in buffers:
        assert buffer.data_ptr() % ALIGNMENT == 0 and buffer.numel() == ALIGNMENT


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tensors_are_written_through_pinned_buffers(tmp_path):
    data = _payload(5 * ALIGNMENT + 123)
    with CheckpointFile(tmp_path / "f", chunk=2 * ALIGNMENT, pinned=True) as handle:
        assert not handle._maps and all(b.is_pinned() for b in handle._buffers)
        handle.write(b"head")
        handle.write(data.cuda())
        handle.write(data[:100])
    expected = b"head" + bytes(data.tolist()) + bytes(data[:100].tolist())
    assert (tmp_path / "f").read_bytes() == expected
