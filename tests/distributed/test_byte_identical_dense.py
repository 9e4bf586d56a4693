"""Distributed calibration on gloo (CPU) writes the same bytes as one process: dense Llama, 1, 2 and 3 ranks.

Each run is separate processes started as torchrun starts them (tests/rank_launch.py); the reference is the
plain path (no torch.distributed) in one process. fp8 with an FP8 KV cache, nvfp4, w4a16 (weight-only, its
KV cache calibrated), a run where a rank has no batch at all (2 batches, 3 ranks), and GPTQ, whose summed
Hessians are equal up to fp32 rounding only: its checkpoint is compared value by value, not byte by byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rank_launch import WORKER, run_plain, run_ranks, tree_bytes

CASES = ["dense-fp8-kv", "dense-fp8-two-batches", "dense-nvfp4", "dense-w4a16-kv"]
GPTQ = "dense-w4a16-gptq"


def _spec(tmp: Path, name: str) -> str:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"out": str(tmp / name), "cases": [*CASES, GPTQ]}))
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("plain")
    result = run_plain([str(WORKER), _spec(tmp, "plain")])
    assert result.returncode == 0, result.stderr
    return tmp / "plain"


def _gptq_close(expected: Path, written: Path) -> None:
    """Same files, same JSON; tensors equal except for codes that fp32 rounding of the Hessian sum moved."""
    assert sorted(tree_bytes(written)) == sorted(tree_bytes(expected))
    for name in ("config.json", "quantport_report.json"):
        assert json.loads((written / name).read_text()) == json.loads((expected / name).read_text())
    a, b = load_file(expected / "model.safetensors"), load_file(written / "model.safetensors")
    assert sorted(a) == sorted(b)
    changed = total = 0
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        changed += int((a[key] != b[key]).sum())
        total += a[key].numel()
    assert changed <= total * 0.01, f"{changed} of {total} values differ"


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_dense_checkpoint_is_byte_identical_to_one_process(reference: Path, tmp_path: Path, world_size: int):
    results = run_ranks([str(WORKER), _spec(tmp_path, "ranks")], world_size)
    for result in results:
        assert result.returncode == 0, f"rank {result.rank}: {result.stderr}"
    for case in CASES:
        expected, written = tree_bytes(reference / case), tree_bytes(tmp_path / "ranks" / case)
        assert "model.safetensors" in written and "quantport_report.json" in written
        assert sorted(written) == sorted(expected), case
        differing = [name for name in expected if written[name] != expected[name]]
        assert differing == [], f"{case}: {differing}"
    report = json.loads((tmp_path / "ranks" / "dense-fp8-kv" / "quantport_report.json").read_text())
    assert report["calibration_tokens"] == 5 * 2 * 16  # every rank's tokens, summed
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == sorted([*CASES, GPTQ])  # nothing else
    _gptq_close(reference / GPTQ, tmp_path / "ranks" / GPTQ)
