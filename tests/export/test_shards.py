from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quantport.errors import OutputWriteError
from quantport.export.output_dir import claim_output
from quantport.export.shards import PlannedTensor, write_sharded_safetensors
from quantport.schemes import TensorSpec


def _plan(tensors: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    return [PlannedTensor(n, TensorSpec(t.dtype, tuple(t.shape)), lambda t=t: t) for n, t in tensors.items()]


TENSORS = {
    "b.weight": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4),
    "a.scale": torch.tensor(0.25),
    "c.codes": torch.arange(8, dtype=torch.uint8),
    "d.fp8": torch.tensor([1.0, -2.0, 448.0]).to(torch.float8_e4m3fn),
    "e.idx": torch.tensor([1, 2, 3], dtype=torch.int32),
}


def test_single_file_reads_back_exactly(tmp_path):
    files = write_sharded_safetensors(_plan(TENSORS), tmp_path, progress=False)
    assert files == ["model.safetensors"] and not (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_file(tmp_path / "model.safetensors")
    assert sorted(loaded) == sorted(TENSORS)
    for name, tensor in TENSORS.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_shards_and_index(tmp_path):
    files = write_sharded_safetensors(_plan(TENSORS), tmp_path, max_shard_size=20, progress=False)
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(TENSORS)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in TENSORS.values())
    for name, file in index["weight_map"].items():
        assert name in load_file(tmp_path / file)


def test_planned_spec_is_enforced(tmp_path):
    plan = [PlannedTensor("x", TensorSpec(torch.float32, (2,)), lambda: torch.zeros(3))]
    with pytest.raises(AssertionError, match="planned"):
        write_sharded_safetensors(plan, tmp_path, progress=False)


def test_many_tensors_queued_for_the_writer_keep_their_order(tmp_path, monkeypatch):
    from quantport.export import shard_queue

    monkeypatch.setattr(shard_queue, "IN_FLIGHT_BYTES", 1)  # every tensor waits: no reordering either way
    gen = torch.Generator().manual_seed(3)
    tensors = {
        f"t{i:03d}": torch.randint(0, 256, (int(n),), generator=gen, dtype=torch.uint8)
        for i, n in enumerate(torch.randint(1, 70000, (60,), generator=gen))
    }
    write_sharded_safetensors(_plan(tensors), tmp_path, progress=False)
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    monkeypatch.setattr(shard_queue, "IN_FLIGHT_BYTES", 1 << 40)  # nothing waits until the end
    (tmp_path / "all").mkdir()
    write_sharded_safetensors(_plan(tensors), tmp_path / "all", progress=False)
    loaded = load_file(tmp_path / "all" / "model.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def _many_tensors(n: int = 40, size: int = 300_000) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {f"t{i:03d}": torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8) for i in range(n)}


def test_a_failing_computation_mid_write_leaves_no_output(tmp_path):
    tensors = _many_tensors()
    plan = _plan(tensors)
    broken = plan[25]

    def fail():
        raise RuntimeError("quantization failed")

    plan[25] = PlannedTensor(broken.name, broken.spec, fail)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="quantization failed"), claim_output(out).writing() as staging:
        write_sharded_safetensors(plan, staging, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_failing_file_write_is_raised_and_leaves_no_output(tmp_path, monkeypatch):
    import errno
    import os

    from quantport.export import checkpoint_file

    real_pwrite, calls = os.pwrite, {"n": 0}

    def disk_full_later(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(checkpoint_file.os, "pwrite", disk_full_later)
    out = tmp_path / "out"
    with pytest.raises(OutputWriteError, match="No space left on device.*free"), claim_output(out).writing() as st:
        write_sharded_safetensors(_plan(_many_tensors()), st, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_natural_order_reads_numbers():
    from quantport.export.shards import natural_order

    names = ["m.experts.10.w", "m.experts.2.w", "m.experts.1.w", "m.layers.11.a", "m.layers.9.a", "lm_head.weight"]
    assert sorted(names, key=natural_order) == [
        "lm_head.weight", "m.experts.1.w", "m.experts.2.w", "m.experts.10.w", "m.layers.9.a", "m.layers.11.a",
    ]  # fmt: skip
