"""Small tensors written in groups (export/small_tensors.py): the same shard bytes as one tensor at a time, with
and without the self-check's witness, groups filling up and crossing the write buffer's chunks; on a GPU too."""

from __future__ import annotations

import pytest
import torch

from quantport.export import checkpoint_file, small_tensors
from quantport.export.shards import PlannedTensor, write_sharded_safetensors
from quantport.export.small_tensors import SmallTensorGroup
from quantport.export.value_witness import ValueWitness, WrittenTensor
from quantport.schemes import TensorSpec


def _tensors(device: str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for i in range(40):
        out[f"layers.{i}.proj.weight"] = torch.randint(0, 256, (i % 7 * 300 + 1,), generator=gen, dtype=torch.uint8)
        out[f"layers.{i}.proj.weight_scale"] = torch.rand(i % 5 + 3, generator=gen).to(torch.float8_e4m3fn)
        out[f"layers.{i}.proj.input_scale"] = torch.rand((), generator=gen)
        out[f"layers.{i}.norm.weight"] = torch.rand(i + 1, generator=gen).bfloat16()
        if i % 9 == 0:
            out[f"layers.{i}.big"] = torch.randn(70_000, generator=gen).bfloat16()  # written on its own
    return {name: t.to(device) for name, t in out.items()}


def _write(directory, tensors, *, witness: ValueWitness | None = None) -> dict[str, bytes]:
    plan = [PlannedTensor(n, TensorSpec(t.dtype, tuple(t.shape)), lambda t=t: t) for n, t in tensors.items()]
    directory.mkdir()
    write_sharded_safetensors(plan, directory, max_shard_size="300KB", progress=False, witness=witness)
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("with_witness", [False, True], ids=["plain", "witnessed"])
def test_grouped_writes_are_byte_identical_to_one_tensor_at_a_time(tmp_path, monkeypatch, with_witness):
    monkeypatch.setattr(checkpoint_file, "CHUNK", 8192)  # groups cross the write buffer's chunks
    tensors = _tensors()
    monkeypatch.setattr(small_tensors, "GATHERED_BYTES", -1)  # nothing grouped
    alone = _write(tmp_path / "alone", tensors)
    monkeypatch.setattr(small_tensors, "GATHERED_BYTES", 2048)
    monkeypatch.setattr(small_tensors, "GROUP_BYTES", 6000)  # groups fill up and start again
    groups: list[int] = []
    take = SmallTensorGroup.take

    def counting(self):
        tensors, data = take(self)
        groups.append(len(tensors))
        return tensors, data

    monkeypatch.setattr(SmallTensorGroup, "take", counting)
    witness = ValueWitness() if with_witness else None
    grouped = _write(tmp_path / "grouped", tensors, witness=witness)
    assert grouped == alone and len(alone) > 3
    assert max(groups) > 5 and len(groups) > 5  # many groups of many tensors
    if witness is not None:
        result = witness.result()
        assert result.scalars == {n: t.float().item() for n, t in tensors.items() if t.numel() == 1}
        floats = {n for n, t in tensors.items() if t.dtype == torch.bfloat16}
        scales = {n for n in tensors if n.endswith("weight_scale")}
        assert result.clean == floats | scales


def test_group_takes_small_tensors_of_one_device_only():
    group = SmallTensorGroup()
    small = torch.zeros(10, dtype=torch.uint8)
    assert group.accepts(small) and not group.accepts(torch.zeros(small_tensors.GATHERED_BYTES + 1, dtype=torch.uint8))
    group.add(WrittenTensor("a", "U8", 10), small)
    small.fill_(7)  # copied at add(): later changes do not reach the group
    tensors, data = group.take()
    assert [t.name for t in tensors] == ["a"] and data.tolist() == [0] * 10
    assert len(group) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tensors_grouped_on_the_device_write_the_cpu_bytes(tmp_path, monkeypatch):
    torch.cuda.init()  # the writer uses page-locked buffers once CUDA is initialized
    cpu = _write(tmp_path / "cpu", _tensors(), witness=ValueWitness())
    witness = ValueWitness()
    gpu = _write(tmp_path / "gpu", _tensors("cuda"), witness=witness)
    assert gpu == cpu
    assert witness.result().scalars
