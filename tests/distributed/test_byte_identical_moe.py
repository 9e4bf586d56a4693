"""Distributed calibration on gloo (CPU) writes the same bytes as one process: Qwen3-MoE, 2 and 3 ranks.

Expert input amax (MAX) and tokens per expert (SUM, in the report's coverage) are reduced over the ranks;
nvfp4 (static input scales) and w4a16-nvfp4 (weight-only: calibrated for the coverage report).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rank_launch import WORKER, run_plain, run_ranks, tree_bytes

CASES = ["moe-nvfp4", "moe-w4a16-nvfp4"]


def _spec(tmp: Path, name: str) -> str:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"out": str(tmp / name), "cases": CASES}))
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("plain")
    result = run_plain([str(WORKER), _spec(tmp, "plain")])
    assert result.returncode == 0, result.stderr
    return tmp / "plain"


@pytest.mark.parametrize("world_size", [2, 3])
def test_moe_checkpoint_is_byte_identical_to_one_process(reference: Path, tmp_path: Path, world_size: int):
    results = run_ranks([str(WORKER), _spec(tmp_path, "ranks")], world_size)
    for result in results:
        assert result.returncode == 0, f"rank {result.rank}: {result.stderr}"
    for case in CASES:
        expected, written = tree_bytes(reference / case), tree_bytes(tmp_path / "ranks" / case)
        assert sorted(written) == sorted(expected), case
        differing = [name for name in expected if written[name] != expected[name]]
        assert differing == [], f"{case}: {differing}"
    report = json.loads((tmp_path / "ranks" / "moe-nvfp4" / "quantport_report.json").read_text())
    tokens = [sum(per_expert) for per_expert in report["coverage"]["layers"].values()]
    assert tokens and all(t == 5 * 2 * 16 * 2 for t in tokens)  # 160 tokens x top-2, over all ranks
