"""Flat buffers reduce to what one collective per tensor gives, on 2 and 3 gloo ranks, and to the values worked
out by hand: MAX of the maxima (None as never observed, NaN kept non-finite, dtypes kept), SUM of the sums
(int64 exact beyond 2**32), in one collective per (op, dtype) plus one per large tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rank_launch import run_ranks

WORKER = Path(__file__).resolve().parent / "statistics_worker.py"
INF = float("inf")


def _by_hand(world_size: int) -> tuple[dict, dict]:
    ranks = sum(range(world_size))  # 0 + 1 + ... + (W - 1)
    maximum = {
        "a": torch.tensor(1.5 + world_size - 1),
        "bf16": torch.tensor([world_size - 1, 0, 3], dtype=torch.bfloat16),
        "experts": torch.tensor([world_size - 1, 10, 5], dtype=torch.float32),
        "only_rank1": torch.tensor(7.0),
        "never": None,
        "nan_on_last": torch.tensor(INF),
        "large": torch.arange(20, dtype=torch.float32) * world_size,
    }
    sums = {
        "tokens": torch.tensor([ranks, world_size, world_size * 2**40, -ranks], dtype=torch.int64),
        "calibration_tokens": torch.tensor(100 * world_size * (world_size + 1) // 2, dtype=torch.int64),
        "h_small": torch.full((2, 2), 0.25 * world_size + ranks),
        "h_large": torch.full((5, 5), 0.5 * world_size + ranks),
        "f64": torch.tensor([0.25 * ranks, -1.0 * world_size], dtype=torch.float64),
    }
    return maximum, sums


def _same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        if value is None:
            assert got[name] is None, name
            continue
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert torch.equal(got[name], value), f"{name}: {got[name]} != {value}"


@pytest.mark.parametrize("world_size", [2, 3])
def test_flat_reduction_equals_one_collective_per_tensor(tmp_path: Path, world_size: int):
    results = run_ranks([str(WORKER), str(tmp_path)], world_size)
    for result in results:
        assert result.returncode == 0, f"rank {result.rank}: {result.stderr}"
    maximum, sums = _by_hand(world_size)
    for rank in range(world_size):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        for key in ("flat", "one_by_one"):
            _same(saved[key][0], maximum)
            _same(saved[key][1], sums)
        # maxima: one fp32 buffer of 10 values + the large [20]; sums: int64, fp32 and fp64 buffers + the large [5, 5]
        assert sorted(saved["calls"]) == sorted([10, 20, 5, 4, 2, 25])
