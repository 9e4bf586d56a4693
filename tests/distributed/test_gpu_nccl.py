"""On GPUs: NCCL ranks (one per GPU) write the same bytes as one process on the first GPU.

One rank always (the one-rank NCCL path); 2 ranks when the machine has 2 GPUs. The plain reference runs on
``cuda:0``; with 2 ranks, rank 1 calibrates on ``cuda:1``, so this also checks that two GPUs of the same model
compute the same activations for the same batch (same kernels; true on a machine of identical GPUs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rank_launch import WORKER, run_plain, run_ranks, tree_bytes

pytestmark = pytest.mark.gpu

CASES = ["dense-fp8-kv", "dense-nvfp4", "moe-nvfp4"]


def _spec(tmp: Path, name: str) -> str:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"out": str(tmp / name), "cases": CASES, "device": "cuda"}))
    return str(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("world_size", [1, 2])
def test_nccl_ranks_write_the_bytes_of_one_gpu_process(tmp_path: Path, world_size: int):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    plain = run_plain([str(WORKER), _spec(tmp_path, "plain")], timeout=300)
    assert plain.returncode == 0, plain.stderr
    results = run_ranks([str(WORKER), _spec(tmp_path, "ranks")], world_size, timeout=300)
    for result in results:
        assert result.returncode == 0, f"rank {result.rank}: {result.stderr}"
    for case in CASES:
        expected, written = tree_bytes(tmp_path / "plain" / case), tree_bytes(tmp_path / "ranks" / case)
        assert sorted(written) == sorted(expected), case
        assert [name for name in expected if written[name] != expected[name]] == [], case
