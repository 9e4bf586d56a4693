"""O_DIRECT writes (DirectPolicy): the same shard bytes with O_DIRECT on and off on a real disk directory, a clean
page-cache fallback on tmpfs, the automatic choice by shard size, and a tap that sees exactly the file's bytes."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch

from quantport.export import checkpoint_file, shards
from quantport.export.checkpoint_file import ALIGNMENT, CheckpointFile, DirectPolicy, WriteMode, WriteRoute
from quantport.export.shards import PlannedTensor, direct_policy, write_sharded_safetensors
from quantport.schemes import TensorSpec

CHUNK = 2 * ALIGNMENT
SHM = Path("/dev/shm")
_INIT = CheckpointFile.__init__


def _file_system(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout.strip()


def _direct_works(directory: Path) -> bool:
    handle = CheckpointFile(directory / "probe.bin", chunk=CHUNK, policy=DirectPolicy.ALWAYS)
    handle.close()
    (directory / "probe.bin").unlink()
    return handle.route.direct_allowed


@pytest.fixture
def disk_dir(tmp_path) -> Path:
    """tmp_path when it is on a file system that takes O_DIRECT (here /tmp is ext4, not tmpfs)."""
    if not hasattr(os, "O_DIRECT") or _file_system(tmp_path) == "tmpfs" or not _direct_works(tmp_path):
        pytest.skip(f"{tmp_path} ({_file_system(tmp_path)}) takes no O_DIRECT")
    return tmp_path


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {f"layers.{i}.w": torch.randn(61, 47, generator=gen).to(torch.bfloat16) for i in range(12)}
    out["layers.5.odd"] = torch.randint(0, 256, (4097,), generator=gen, dtype=torch.uint8)  # unaligned lengths
    out["layers.7.scale"] = torch.rand(3, generator=gen)
    return out


def _plan(tensors) -> list[PlannedTensor]:
    return [PlannedTensor(n, TensorSpec(t.dtype, tuple(t.shape)), lambda t=t: t) for n, t in tensors.items()]


def _write(directory: Path, policy: DirectPolicy | None, monkeypatch, routes: list[WriteRoute]) -> dict[str, bytes]:
    monkeypatch.setattr(shards, "DIRECT_WRITES", policy)
    monkeypatch.setattr(checkpoint_file, "CHUNK", CHUNK)  # many chunks per shard, so the route matters

    def recording(self, path, chunk=CHUNK, route=None, pinned=False, policy=DirectPolicy.ADAPTIVE):
        _INIT(self, path, chunk=chunk, route=route, pinned=pinned, policy=policy)
        routes.append(self.route)

    monkeypatch.setattr(CheckpointFile, "__init__", recording)
    directory.mkdir()
    write_sharded_safetensors(_plan(_tensors()), directory, max_shard_size="30KB", progress=False, shard_workers=2)
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_shards_are_byte_identical_with_o_direct_on_and_off(disk_dir, monkeypatch):
    files = {}
    for policy in (DirectPolicy.NEVER, DirectPolicy.ALWAYS, DirectPolicy.ADAPTIVE):
        routes: list[WriteRoute] = []
        files[policy] = _write(disk_dir / policy.value, policy, monkeypatch, routes)
        modes = {mode for route in routes for mode, _, _ in route.history}
        if policy is DirectPolicy.ALWAYS:
            assert modes == {WriteMode.DIRECT} and all(r.direct_allowed for r in routes)
        if policy is DirectPolicy.NEVER:
            assert modes == {WriteMode.CACHED}
    assert len(files[DirectPolicy.NEVER]) > 3  # shards and the index
    assert files[DirectPolicy.ALWAYS] == files[DirectPolicy.NEVER] == files[DirectPolicy.ADAPTIVE]


@pytest.mark.skipif(not SHM.is_dir() or _file_system(SHM) != "tmpfs", reason="no tmpfs at /dev/shm")
def test_tmpfs_gets_the_same_bytes_whether_it_takes_o_direct_or_not(tmp_path, monkeypatch, caplog):
    """tmpfs refuses O_DIRECT (EINVAL) before Linux 6.6 and takes it since: either way the bytes are the same, and
    a refusal is a debug log and page-cache writes."""
    directory = Path(os.fspath(SHM)) / f"quantport-test-{os.getpid()}-{tmp_path.name}"
    routes: list[WriteRoute] = []
    try:
        with caplog.at_level(logging.DEBUG, logger="quantport.export.checkpoint_file"):
            written = _write(directory, DirectPolicy.ALWAYS, monkeypatch, routes)
    finally:
        for path in sorted(directory.iterdir()) if directory.exists() else []:
            path.unlink()
        if directory.exists():
            directory.rmdir()
    refused = any("O_DIRECT refused" in record.getMessage() for record in caplog.records)
    assert routes and all(route.direct_allowed is not refused for route in routes)
    expected = {WriteMode.CACHED} if refused else {WriteMode.DIRECT}
    assert {mode for route in routes for mode, _, _ in route.history} == expected
    assert written == _write(tmp_path / "cached", DirectPolicy.NEVER, monkeypatch, [])


def test_a_file_system_that_refuses_o_direct_falls_back_with_a_debug_log(tmp_path, monkeypatch, caplog):
    real_open = os.open

    def refusing(path, flags, *args):  # what tmpfs before Linux 6.6 and some network file systems do
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(checkpoint_file.os, "open", refusing)
    routes: list[WriteRoute] = []
    with caplog.at_level(logging.DEBUG, logger="quantport.export.checkpoint_file"):
        written = _write(tmp_path / "refused", DirectPolicy.ALWAYS, monkeypatch, routes)
    assert routes and not any(route.direct_allowed for route in routes)
    assert {mode for route in routes for mode, _, _ in route.history} == {WriteMode.CACHED}
    assert any("O_DIRECT refused" in record.getMessage() for record in caplog.records)
    monkeypatch.setattr(checkpoint_file.os, "open", real_open)
    assert written == _write(tmp_path / "cached", DirectPolicy.NEVER, monkeypatch, [])


def test_policy_is_chosen_by_shard_size(monkeypatch):
    monkeypatch.setattr(shards, "DIRECT_WRITES", None)
    assert direct_policy(shards.DIRECT_MIN_BYTES) is DirectPolicy.ALWAYS
    assert direct_policy(5 << 30) is DirectPolicy.ALWAYS
    assert direct_policy(shards.DIRECT_MIN_BYTES - 1) is DirectPolicy.NEVER
    monkeypatch.setattr(shards, "DIRECT_WRITES", DirectPolicy.ADAPTIVE)
    assert direct_policy(5 << 30) is DirectPolicy.ADAPTIVE


def test_never_does_not_open_o_direct(tmp_path, monkeypatch):
    real_open = os.open
    flags_seen: list[int] = []

    def recording(path, flags, *args):
        flags_seen.append(flags)
        return real_open(path, flags, *args)

    monkeypatch.setattr(checkpoint_file.os, "open", recording)
    with CheckpointFile(tmp_path / "f.bin", chunk=CHUNK, policy=DirectPolicy.NEVER) as handle:
        handle.write(b"x" * (3 * CHUNK + 5))
    assert not any(flags & getattr(os, "O_DIRECT", 0) for flags in flags_seen)
    assert (tmp_path / "f.bin").read_bytes() == b"x" * (3 * CHUNK + 5)


def test_always_writes_the_padded_tail_direct_and_truncates(disk_dir):
    data = torch.randint(0, 256, (3 * CHUNK + 123,), dtype=torch.uint8)
    with CheckpointFile(disk_dir / "f.bin", chunk=CHUNK, policy=DirectPolicy.ALWAYS) as handle:
        handle.write(b"head")
        handle.write(data)
    assert [mode for mode, _, _ in handle.route.history] == [WriteMode.DIRECT] * 3  # full chunks observed
    assert (disk_dir / "f.bin").read_bytes() == b"head" + data.numpy().tobytes()


def test_tap_sees_exactly_the_bytes_of_the_file(tmp_path):
    gen = torch.Generator().manual_seed(3)
    pieces = [torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8) for n in (5, CHUNK, 3 * CHUNK + 7, 1)]
    tapped = bytearray()
    with CheckpointFile(tmp_path / "f.bin", chunk=CHUNK, policy=DirectPolicy.ALWAYS) as handle:
        handle.write(b"header")
        for piece in pieces:
            handle.write(piece, tapped.extend)
    assert bytes(tapped) == b"".join(p.numpy().tobytes() for p in pieces)
    assert (tmp_path / "f.bin").read_bytes() == b"header" + bytes(tapped)
