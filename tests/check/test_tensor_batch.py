"""Batched reads of many small tensors: the same values as one read per tensor, the same errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantport.check.checkpoint import Checkpoint
from quantport.check.scalars import SCALAR_DTYPES, read_scalars
from quantport.check.tensor_batch import read_batch
from quantport.read import HeaderError


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (6, 4), dtype=torch.uint8, generator=gen)
    return {
        "a.weight": torch.randn(8, 4, generator=gen).to(torch.bfloat16),
        "a.weight_scale": codes.view(torch.float8_e4m3fn),
        "a.weight_scale_2": torch.tensor(0.25),
        "a.input_scale": torch.tensor([3.5]),
        "b.scales": torch.randint(0, 256, (3, 5), dtype=torch.uint8, generator=gen),
        "b.bias": torch.randn(7, generator=gen).to(torch.float16),
        "b.index": torch.arange(5, dtype=torch.int64),
        "b.flag": torch.tensor([True, False]),
        "c.empty": torch.zeros(0, 3),
        "c.half_scalar": torch.tensor(-2.0, dtype=torch.float16),
        "c.e8m0": torch.tensor([127], dtype=torch.uint8).view(torch.float8_e8m0fnu),
    }


@pytest.fixture
def ckpt(tmp_path: Path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    opened = Checkpoint.open(tmp_path)
    yield opened
    opened.close()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and bytes(a.reshape(-1).view(torch.uint8).numpy()) == bytes(b.reshape(-1).view(torch.uint8).numpy())
    )


def test_every_tensor_reads_as_a_single_read_does(ckpt):
    infos = list(ckpt.tensors.values())
    batch = read_batch(ckpt, infos)
    assert set(batch.slots) == set(ckpt.tensors)
    for name, expected in _tensors().items():
        assert _same(batch.tensor(name), ckpt.load(name)), name
        assert _same(batch.tensor(name), expected), name


def test_each_dtype_is_one_flat_tensor_in_the_given_order(ckpt):
    order = ["b.bias", "a.weight_scale_2", "a.input_scale", "c.half_scalar"]
    batch = read_batch(ckpt, [ckpt.tensors[n] for n in order])
    expected = _tensors()
    assert torch.equal(batch.typed("F32"), torch.tensor([0.25, 3.5]))
    assert torch.equal(batch.typed("F16"), torch.cat([expected["b.bias"], expected["c.half_scalar"].reshape(1)]))


def test_adjacent_tensors_are_read_by_one_call(ckpt, monkeypatch):
    calls = []
    real = os.preadv

    def counting(fd, buffers, offset):
        calls.append(len(buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting)
    everything = sorted(ckpt.tensors.values(), key=lambda i: i.offsets)
    read_batch(ckpt, everything)
    assert calls == [len(everything)]  # safetensors writes tensors back to back: one run
    calls.clear()
    read_batch(ckpt, [everything[0], everything[2]])  # not adjacent: two runs
    assert calls == [1, 1]


def test_a_file_cut_after_the_header_was_read_fails_as_a_single_read_does(ckpt):
    file = ckpt.path / "model.safetensors"
    last = max(ckpt.tensors.values(), key=lambda i: i.offsets[1] if i.nbytes else -1)
    os.truncate(file, file.stat().st_size - 1)
    with pytest.raises(HeaderError) as single:
        ckpt.load(last.name)
    with pytest.raises(HeaderError) as batched:
        read_batch(ckpt, list(ckpt.tensors.values()))
    assert batched.value.truncated and single.value.truncated
    assert batched.value.message == single.value.message
    assert f"tensor {last.name!r} cannot be read: the file ends inside it" == batched.value.message


def test_scalars_are_the_floats_a_single_read_gives(ckpt):
    values = read_scalars(ckpt)
    one_element = {n for n, i in ckpt.tensors.items() if i.numel == 1 and i.dtype in SCALAR_DTYPES}
    assert set(values) == one_element == {"a.weight_scale_2", "a.input_scale", "c.half_scalar"}
    for name, value in values.items():
        assert value == float(ckpt.load_float(name).reshape(())), name
    assert values["c.half_scalar"] == -2.0 and values["a.input_scale"] == 3.5


def test_scalars_of_a_cut_file_are_left_to_single_reads(ckpt):
    file = ckpt.path / "model.safetensors"
    os.truncate(file, ckpt.data_starts["model.safetensors"])  # only the header is left
    assert read_scalars(ckpt) == {}
