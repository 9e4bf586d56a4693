"""Runs of neighbouring tensors computed in one call (export/shards.py TensorRun): the same shard bytes as one
tensor at a time, where a shard boundary cuts a run, with the self-check's witness, and one call per piece of run
a shard holds."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from quantport.export.shards import PlannedTensor, TensorRun, write_sharded_safetensors
from quantport.export.value_witness import ValueWitness
from quantport.schemes import TensorSpec


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for e in range(12):
        out[f"experts.{e}.down.input_scale"] = torch.rand((), generator=gen)
        out[f"experts.{e}.down.weight"] = torch.randint(0, 256, (64, 40), generator=gen, dtype=torch.uint8)
        out[f"experts.{e}.down.weight_scale"] = torch.rand(64, 5, generator=gen).to(torch.float8_e4m3fn)
        out[f"experts.{e}.up.weight"] = torch.randn(30, 7, generator=gen).bfloat16()
    out["norm.weight"] = torch.randn(100, generator=gen).bfloat16()
    return out


def _plan(tensors: dict[str, torch.Tensor], calls: list[list[str]] | None) -> list[PlannedTensor]:
    def compute(names):
        calls.append(list(names))
        return torch.cat([tensors[n].reshape(-1).view(torch.uint8) for n in names])

    runs = {chunk: TensorRun(compute) for chunk in range(3)}  # experts 0-3, 4-7, 8-11
    plan = []
    for name, t in tensors.items():
        run = runs[int(name.split(".")[1]) // 4] if calls is not None and name.startswith("experts.") else None
        plan.append(PlannedTensor(name, TensorSpec(t.dtype, tuple(t.shape)), lambda t=t: t, run=run))
    return plan


def _write(directory, plan, witness=None) -> dict[str, bytes]:
    directory.mkdir()
    write_sharded_safetensors(plan, directory, max_shard_size="9KB", progress=False, witness=witness)
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("with_witness", [False, True], ids=["plain", "witnessed"])
def test_runs_write_the_bytes_of_one_tensor_at_a_time(tmp_path, with_witness):
    tensors = _tensors()
    alone = _write(tmp_path / "alone", _plan(tensors, None))
    calls: list[list[str]] = []
    witness = ValueWitness() if with_witness else None
    in_runs = _write(tmp_path / "runs", _plan(tensors, calls), witness)
    assert in_runs == alone and len(alone) > 4  # several shards (and the index)
    # each call asks for neighbours of one run in file order; shard boundaries cut runs, so there are more
    # calls than runs; no tensor is asked for twice, and only one left alone at a cut is computed on its own
    assert len(calls) > 3 and all(len(c) > 1 for c in calls)
    asked = [n for c in calls for n in c]
    experts = [n for n in tensors if n.startswith("experts.")]
    assert len(set(asked)) == len(asked) and set(asked) <= set(experts)
    assert len(experts) - len(asked) < len(alone)
    loaded = {}
    for file in sorted((tmp_path / "runs").glob("*.safetensors")):
        loaded |= load_file(file)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
    if witness is not None:
        result = witness.result()
        assert result.scalars == {n: t.item() for n, t in tensors.items() if t.numel() == 1}
        assert {n for n in tensors if n.endswith("weight_scale")} <= result.clean


def test_a_run_of_the_wrong_size_is_refused(tmp_path):
    tensors = _tensors()
    short = TensorRun(lambda names: torch.zeros(3, dtype=torch.uint8))
    plan = [
        PlannedTensor(e.name, e.spec, e.compute, run=short) if e.name.startswith("experts.0.") else e
        for e in _plan(tensors, None)
    ]
    (tmp_path / "out").mkdir()
    with pytest.raises(AssertionError, match="run computed"):
        write_sharded_safetensors(plan, tmp_path / "out", progress=False)
