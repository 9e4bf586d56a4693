"""A rank that fails makes every rank stop with the same one-line error (exit 2), and nothing is written.

Bad input on one rank: calibration batch 4 is malformed, so in a 3-rank run only rank 1 (4 % 3) meets it.
A rank that dies after joining (no exception, no vote): the others fail at their next vote, at once (its
connection closes) or at the latest after ``QUANTPORT_DIST_TIMEOUT_S``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rank_launch import WORKER, run_ranks


def _spec(tmp: Path, **extra) -> str:
    path = tmp / "spec.json"
    path.write_text(json.dumps({"out": str(tmp / "out"), "cases": ["dense-fp8-kv"], **extra}))
    return str(path)


def test_one_rank_with_bad_input_stops_every_rank_with_its_error(tmp_path: Path):
    results = run_ranks([str(WORKER), _spec(tmp_path, bad_batch=4)], 3)
    assert [r.returncode for r in results] == [2, 2, 2], [r.stderr for r in results]
    lines = [r.error_lines() for r in results]
    assert all(len(found) == 1 for found in lines), lines
    assert lines[0] == lines[1] == lines[2]
    assert lines[0][0] == (
        "error: rank 1 of 3 failed in quantize: calibration batch must be input_ids [B, T], got shape [1, 2, 16] "
        "(every rank stopped; nothing was written)"
    )
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]  # no staging directory either


def test_a_rank_that_dies_does_not_leave_the_others_waiting(tmp_path: Path):
    results = run_ranks([str(WORKER), _spec(tmp_path, die_rank=1)], 2, extra={"QUANTPORT_DIST_TIMEOUT_S": "60"})
    assert results[1].returncode == 3  # os._exit in the worker
    assert results[0].returncode == 2, results[0].stderr
    (line,) = results[0].error_lines()
    assert line.startswith("error: rank 0 of 2: not every rank answered at 'calibration' within 60 s")
    assert "QUANTPORT_DIST_TIMEOUT_S" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]
