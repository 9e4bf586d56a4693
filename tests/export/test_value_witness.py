"""The self-check's value tests run on the bytes as each shard is written (export/value_witness.py): they vouch
for exactly what the checker would find clean, their scalars are the values read back from the files, and a bad
tensor in one shard of several is still reported, with the same findings as a check that reads everything."""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
import torch

import quantport
from moe_models import tiny_moe
from quantport.check import check_checkpoint
from quantport.check.checkpoint import Checkpoint
from quantport.check.rules.scales import is_scale
from quantport.check.scalars import read_scalars
from quantport.export import FORMAT_CONTENT, ExportFormat, small_tensors, value_witness
from quantport.export.self_check import SelfCheckError
from quantport.export.value_witness import ValueKind, ValueWitness, WrittenTensor, value_kind
from tiny_models import make_calibration_batches

BATCHES = make_calibration_batches(vocab_size=256, n=1, seq=16)


@pytest.fixture
def witnesses(monkeypatch) -> list[ValueWitness]:
    """The ValueWitness of every export in the test, kept for inspection."""
    made: list[ValueWitness] = []

    class Kept(ValueWitness):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(importlib.import_module("quantport.export"), "ValueWitness", Kept)
    return made


def _tapped(monkeypatch, tapped_bytes: int) -> None:
    """0: no tensor is grouped with others or tapped: each is tested whole, on the tensor written."""
    monkeypatch.setattr(value_witness, "TAPPED_BYTES", tapped_bytes)
    if tapped_bytes == 0:
        monkeypatch.setattr(small_tensors, "GATHERED_BYTES", -1)


def _export(tmp_path, recipe: str, **kwargs):
    model = tiny_moe("qwen3_moe")
    quantport.quantize(model, recipe, BATCHES, progress=False)
    return quantport.export(model, tmp_path / "out", progress=False, **kwargs)


def _findings(report) -> list[tuple[str, str, str]]:
    return sorted((f.rule, f.target, f.message) for f in report.findings)


def test_value_kinds_follow_the_checker_rules():
    assert value_kind("m.weight_scale", "F8_E4M3", 64) is ValueKind.SCALE
    assert value_kind("m.input_scale", "F32", 1) is ValueKind.SCALAR  # a per-tensor value, not an array
    assert value_kind("m.weight_scale", "I8", 1) == ValueKind.SCALE | ValueKind.SCALAR
    assert value_kind("model.norm.weight", "BF16", 64) is ValueKind.FLOAT
    assert value_kind("m.bias", "F32", 1) == ValueKind.FLOAT | ValueKind.SCALAR
    assert value_kind("m.weight", "U8", 512) is ValueKind.NONE  # packed FP4: no value rule reads it
    assert value_kind("m.weight", "F8_E4M3", 512) is ValueKind.NONE


@pytest.mark.parametrize("recipe", ["nvfp4", "fp8"])
@pytest.mark.parametrize("tapped_bytes", [1 << 20, 0], ids=["grouped-tapped", "whole-tensors"])
def test_witness_vouches_for_every_value_the_checker_reads(tmp_path, witnesses, monkeypatch, recipe, tapped_bytes):
    _tapped(monkeypatch, tapped_bytes)
    out = _export(tmp_path, recipe, max_shard_size="40KB")  # several shards
    assert len(list(out.glob("*.safetensors"))) > 2
    witnessed = witnesses[0].result()
    ckpt = Checkpoint.open(out)
    try:
        read_back = read_scalars(ckpt)  # nothing witnessed: every value from the files
        kinds = {name: value_kind(name, info.dtype, info.numel) for name, info in ckpt.tensors.items()}
        arrays = {n for n, k in kinds.items() if k & (ValueKind.SCALE | ValueKind.FLOAT)}
        assert any(not is_scale(ckpt.tensors[n]) for n in arrays)  # norms, embeddings, routers
        assert recipe == "fp8" or any(is_scale(ckpt.tensors[n]) for n in arrays)  # NVFP4 block scales
    finally:
        ckpt.close()
    assert witnessed.clean == frozenset(arrays)  # a valid export: every tested tensor is clean
    assert witnessed.scalars == read_back  # the very values a read of the files gives
    assert _findings(check_checkpoint(out, witnessed=witnessed)) == _findings(check_checkpoint(out))


def _poison(monkeypatch, suffix: str, value: float, *, first_only: bool = True) -> str:
    """The ModelOpt plan writes ``value`` into the first element of one tensor whose name ends with ``suffix``."""
    original = FORMAT_CONTENT[ExportFormat.MODELOPT]
    victims: list[str] = []

    def poisoned(model, state):
        content = original(model, state)
        plan = list(content.plan)
        index = next(i for i, t in enumerate(plan) if t.name.endswith(suffix) and "layers.1." in t.name)
        entry = plan[index]

        def compute(entry=entry):
            tensor = entry.compute().clone()
            tensor.view(-1)[0] = value
            return tensor

        plan[index] = replace(entry, compute=compute, borrowed=False, run=None)  # alone: its run is cut in two
        victims.append(entry.name)
        return replace(content, plan=plan)

    monkeypatch.setitem(FORMAT_CONTENT, ExportFormat.MODELOPT, poisoned)
    return victims


@pytest.mark.parametrize("tapped_bytes", [1 << 20, 0], ids=["grouped-tapped", "whole-tensors"])
@pytest.mark.parametrize(
    ("suffix", "value", "rule"),
    [
        ("experts.2.down_proj.weight_scale", float("nan"), "scale.not-finite"),  # a block scale (E4M3 array)
        ("experts.1.up_proj.input_scale", 0.0, "scale.not-positive"),  # a per-tensor value
        ("post_attention_layernorm.weight", float("inf"), "weight.not-finite"),  # an unquantized float
    ],
    ids=["block-scale-nan", "input-scale-zero", "norm-inf"],
)
def test_a_bad_tensor_in_one_shard_is_found_by_the_overlapped_check(
    tmp_path, witnesses, monkeypatch, suffix, value, rule, tapped_bytes
):
    _tapped(monkeypatch, tapped_bytes)
    victims = _poison(monkeypatch, suffix, value)
    with pytest.raises(SelfCheckError, match=rf"\[[^]]*{rule}[^]]*\]") as error:
        _export(tmp_path, "nvfp4", max_shard_size="40KB")
    assert victims[0] in str(error.value)
    assert not (tmp_path / "out").exists()
    witnessed = witnesses[0].result()
    assert victims[0] not in witnessed.clean
    if rule == "scale.not-positive":
        assert witnessed.scalars[victims[0]] == 0.0
    assert witnessed.clean  # the other shards' tensors were vouched for


def test_findings_with_and_without_the_witness_are_the_same_on_a_bad_export(tmp_path, witnesses, monkeypatch):
    victims = _poison(monkeypatch, "experts.3.gate_proj.weight_scale", -1.0)
    out = _export(tmp_path, "nvfp4", max_shard_size="40KB", allow_check_errors=True)
    overlapped = check_checkpoint(out, witnessed=witnesses[0].result())
    assert "scale.not-positive" in overlapped.rules()
    assert any(f.target == victims[0] for f in overlapped.findings)
    assert _findings(overlapped) == _findings(check_checkpoint(out))


def test_a_failing_value_test_leaves_the_tensors_to_the_checker(tmp_path, witnesses, monkeypatch):
    def broken(_batch):
        raise RuntimeError("test failure")

    monkeypatch.setattr(value_witness, "clean_dtypes", broken)
    out = _export(tmp_path, "nvfp4")
    witnessed = witnesses[0].result()
    assert not any("weight_scale" in name and not name.endswith("_2") for name in witnessed.clean)
    assert check_checkpoint(out).ok


def test_scalar_values_are_float32_of_each_dtype(tmp_path):
    from quantport.export.checkpoint_file import CheckpointFile

    witness = ValueWitness()
    shard = witness.shard()
    values = {"a.input_scale": torch.tensor([0.1], dtype=torch.float32), "b.k_scale": torch.tensor(3.5).bfloat16()}
    with CheckpointFile(tmp_path / "f.bin") as handle:
        dtypes = {torch.float32: "F32", torch.bfloat16: "BF16"}
        for name, tensor in values.items():
            shard.write(handle, [WrittenTensor(name, dtypes[tensor.dtype], 1)], tensor.reshape(-1).view(torch.uint8))
    shard.close()
    assert witness.result().scalars == {n: t.float().item() for n, t in values.items()}


def test_a_group_split_across_write_chunks_reaches_each_tensor_kind(tmp_path):
    """One write of several tensors back to back, crossing the file's chunk boundaries: each tensor's bytes
    reach its kinds' batches, the others none."""
    from quantport.export.checkpoint_file import CheckpointFile

    gen = torch.Generator().manual_seed(0)
    tensors = [
        ("a.weight", torch.randint(0, 255, (3000,), generator=gen, dtype=torch.uint8), "U8"),  # packed: untested
        ("a.weight_scale", torch.randint(0, 0x7E, (5000,), generator=gen, dtype=torch.uint8), "F8_E4M3"),
        ("a.input_scale", torch.tensor([0.25]), "F32"),
        ("b.empty_scale", torch.empty(0, dtype=torch.uint8), "F8_E4M3"),
        ("norm.weight", torch.rand(2000, generator=gen).bfloat16(), "BF16"),
        ("b.weight_scale", torch.tensor([0x7F, 1, 2], dtype=torch.uint8), "F8_E4M3"),  # NaN: its batch is not clean
        ("c.k_scale", torch.tensor([2.0]).bfloat16(), "BF16"),
    ]
    data = torch.cat([t.reshape(-1).view(torch.uint8) for _, t, _ in tensors])
    written = [WrittenTensor(name, dtype, t.numel()) for name, t, dtype in tensors]
    witness = ValueWitness()
    shard = witness.shard()
    with CheckpointFile(tmp_path / "f.bin", chunk=4096) as handle:
        handle.write(b"12345")  # the group starts mid-chunk
        shard.write(handle, written, data)
    shard.close()
    result = witness.result()
    assert (tmp_path / "f.bin").read_bytes() == b"12345" + data.numpy().tobytes()
    assert result.scalars == {"a.input_scale": 0.25, "c.k_scale": 2.0}
    assert result.clean == {"norm.weight"}  # the E4M3 batch holds a NaN: its scales are left to the checker


@pytest.mark.parametrize("bad_element", [None, 0, 2047, 2048, 4999], ids=["clean", "first", "split", "next", "last"])
@pytest.mark.parametrize("dtype", ["BF16", "F32", "F8_E4M3"])
def test_large_cpu_tensors_are_tested_piece_by_piece_as_written(tmp_path, monkeypatch, bad_element, dtype):
    """Written from an odd file offset in 4 KB chunks, elements straddle the pieces the tap sees."""
    from quantport.check.checkpoint import TORCH_DTYPES
    from quantport.export.checkpoint_file import CheckpointFile

    monkeypatch.setattr(value_witness, "TAPPED_BYTES", 100)
    name = "model.norm.weight" if dtype != "F8_E4M3" else "m.weight_scale"
    values = torch.rand(5000, generator=torch.Generator().manual_seed(1)).to(TORCH_DTYPES[dtype])
    if bad_element is not None:
        values[bad_element] = float("nan") if dtype == "F8_E4M3" else float("inf")
    witness = ValueWitness()
    shard = witness.shard()
    with CheckpointFile(tmp_path / "f.bin", chunk=4096) as handle:
        handle.write(b"123")
        shard.write(handle, [WrittenTensor(name, dtype, 5000)], values.view(torch.uint8))
    shard.close()
    assert (name in witness.result().clean) is (bad_element is None)
    assert (tmp_path / "f.bin").read_bytes() == b"123" + values.view(torch.uint8).numpy().tobytes()
