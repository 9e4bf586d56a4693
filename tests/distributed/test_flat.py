"""flatten / unflatten: sorted-name layout, dtypes converted and restored, new tensors (never views of the buffer),
and on a GPU one copy per device with no host synchronisation when everything is on the GPU."""

from __future__ import annotations

import pytest
import torch

from quantport.distributed.flat import FlatSlot, flatten, unflatten

CPU = torch.device("cpu")


def _named() -> dict[str, torch.Tensor]:
    return {
        "b.matrix": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "a.scalar": torch.tensor(0.5, dtype=torch.bfloat16),
        "c.vector": torch.tensor([5.0, 6.0, 7.0], dtype=torch.float16),
    }


def test_layout_is_sorted_by_name_in_the_buffer_dtype():
    flat, slots = flatten(_named(), CPU, torch.float32)
    assert flat.dtype == torch.float32
    assert flat.tolist() == [0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert [(s.name, s.start, s.stop) for s in slots] == [("a.scalar", 0, 1), ("b.matrix", 1, 5), ("c.vector", 5, 8)]
    assert slots[0] == FlatSlot("a.scalar", 0, torch.Size([]), torch.bfloat16, CPU)


def test_round_trip_restores_shapes_dtypes_and_values_in_new_tensors():
    named = _named()
    flat, slots = flatten(named, CPU, torch.float32)
    flat.mul_(2)  # what a reduction does to the buffer
    out = unflatten(flat, slots)
    assert sorted(out) == sorted(named)
    for name, tensor in named.items():
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape
        assert torch.equal(out[name], tensor * 2), name
        assert out[name].untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
    flat.zero_()
    assert out["b.matrix"].tolist() == [[2.0, 4.0], [6.0, 8.0]]  # not views of the buffer


def test_the_buffer_is_a_copy_of_the_inputs():
    named = {"x": torch.ones(3)}
    flat, _ = flatten(named, CPU, torch.float32)
    flat.add_(1)
    assert named["x"].tolist() == [1.0, 1.0, 1.0]


def test_integers_stay_exact():
    named = {"tokens": torch.tensor([2**40 + 1, -3], dtype=torch.int64), "n": torch.tensor(7, dtype=torch.int64)}
    flat, slots = flatten(named, CPU, torch.int64)
    assert flat.tolist() == [7, 2**40 + 1, -3]
    assert unflatten(flat, slots)["tokens"].tolist() == [2**40 + 1, -3]


def test_nothing_to_flatten():
    flat, slots = flatten({}, CPU, torch.float32)
    assert flat.numel() == 0 and slots == ()
    assert unflatten(flat, slots) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_host_tensors_cross_once_and_come_back():
    gpu = torch.device("cuda", torch.cuda.current_device())
    named = {
        "amax": torch.tensor(2.0, device=gpu),
        "experts": torch.tensor([1, 2, 3], dtype=torch.int64, device=gpu),
        "host.a": torch.tensor(10, dtype=torch.int64),
        "host.b": torch.tensor([20, 30], dtype=torch.int64),
    }
    flat, slots = flatten(named, gpu, torch.int64)
    assert flat.device == gpu and flat.tolist() == [2, 1, 2, 3, 10, 20, 30]
    out = unflatten(flat, slots)
    assert out["host.b"].device == CPU and out["host.b"].tolist() == [20, 30]
    assert out["experts"].device == gpu and out["amax"].dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_statistics_on_the_gpu_never_synchronise():
    gpu = torch.device("cuda", torch.cuda.current_device())
    named = {f"layer{i}.amax": torch.rand((), device=gpu) for i in range(50)}
    named["experts"] = torch.rand(128, device=gpu, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flat, slots = flatten(named, gpu, torch.float32)
        out = unflatten(flat, slots)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(out[name], tensor) for name, tensor in named.items())
