"""all_finite: NaN and ±inf anywhere, in every float dtype; integer and empty tensors."""

from __future__ import annotations

import pytest
import torch

from quantport.formats.finite import all_finite

FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("position", [0, 7, 4095])
def test_one_bad_value_anywhere_is_found(dtype, bad, position):
    values = torch.linspace(-3, 3, 4096).to(dtype)
    values[position] = bad
    assert not all_finite(values) and not all_finite(values.view(64, 64))


@pytest.mark.parametrize("dtype", FLOATS)
def test_finite_values_including_the_extremes(dtype):
    info = torch.finfo(dtype)
    values = torch.tensor([info.max, -info.max, info.tiny, 0.0, -0.0, 1.0], dtype=dtype)
    assert all_finite(values)


def test_integer_bool_and_empty_tensors_are_finite():
    assert all_finite(torch.tensor([1, 2, 3]))
    assert all_finite(torch.tensor([True, False]))
    assert all_finite(torch.empty(0, 16, dtype=torch.bfloat16))
