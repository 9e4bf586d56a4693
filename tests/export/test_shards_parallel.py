"""Shards written at once (many-core machines): same bytes as one at a time, one cache slot per thread,
and a failure in one shard stops the others and leaves no output."""

from __future__ import annotations

import threading

import pytest
import torch

from quantport.export import shards
from quantport.export.output_dir import claim_output
from quantport.export.shards import OneSlotCache, PlannedTensor, write_sharded_safetensors
from quantport.schemes import TensorSpec


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"layers.{i}.w": torch.randn(64, 48, generator=gen).to(torch.bfloat16) for i in range(24)}


def _plan(tensors: dict[str, torch.Tensor], compute=None) -> list[PlannedTensor]:
    compute = compute or (lambda name, t: t)
    return [
        PlannedTensor(n, TensorSpec(t.dtype, tuple(t.shape)), lambda n=n, t=t: compute(n, t))
        for n, t in tensors.items()
    ]


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_parallel_shards_are_byte_identical_to_serial(tmp_path, workers):
    tensors = _tensors()
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    serial.mkdir(), parallel.mkdir()
    threads: set[str] = set()

    def compute(name, tensor):
        threads.add(threading.current_thread().name)
        return tensor

    files = write_sharded_safetensors(_plan(tensors), serial, max_shard_size=30_000, progress=False, shard_workers=1)
    write_sharded_safetensors(
        _plan(tensors, compute), parallel, max_shard_size=30_000, progress=False, shard_workers=workers
    )
    assert len(files) >= 4
    assert _files(serial) == _files(parallel)
    assert len(threads) == min(workers, len(files)) > 1  # really ran on several threads


def test_one_cache_slot_per_thread():
    cache, computed = OneSlotCache(), []
    barrier = threading.Barrier(2)

    def use(key):
        cache.get(key, lambda: computed.append(key) or f"value-{key}")
        barrier.wait()  # both threads hold their slot at once
        assert cache.get(key, lambda: computed.append(("again", key))) == f"value-{key}"

    threads = [threading.Thread(target=use, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(computed) == ["a", "b"]  # neither thread evicted the other's slot


def test_a_failing_shard_stops_the_others_and_leaves_no_output(tmp_path, monkeypatch):
    tensors = _tensors()
    computed: list[str] = []
    lock = threading.Lock()

    def compute(name, tensor):
        with lock:
            computed.append(name)
        if name == "layers.2.w":
            raise RuntimeError("quantization failed in shard 1")
        return tensor

    out = tmp_path / "out"
    with (
        pytest.raises(RuntimeError, match="quantization failed in shard 1"),
        claim_output(out).writing() as staging,
    ):
        write_sharded_safetensors(
            _plan(tensors, compute), staging, max_shard_size=30_000, progress=False, shard_workers=2
        )
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert len(computed) < len(tensors)  # the other shards stopped early


def test_default_worker_count_follows_the_cores(monkeypatch):
    assert max(1, min(4, (shards.os.cpu_count() or 1) // 4)) == shards.SHARD_WORKERS
