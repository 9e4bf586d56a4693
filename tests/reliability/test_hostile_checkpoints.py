"""Hostile checkpoints end in a clean error or a checker finding, in bounded time and memory.

Every kind in :data:`hostile.KINDS` corrupts a copy of a valid quantport export. ``quantport check``,
``quantport inspect`` and ``quantport.load`` run on it in child processes (several kinds per child, two
children at a time), each child under a time limit and a 4 GB address-space limit. For every kind:
no traceback anywhere; ``check`` exits 1 with the kind's own rule (0 for a warning-only rule) and no
internal error; ``inspect`` exits 0, 1 or 2; ``load`` raises a QuantportError (exit 2) unless the files
are consistent; and every error names the file.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import quantport
from quantport.check import RULES, Severity
from reliability.hostile import KINDS, Kind, make, run_batch
from tiny_models import TINY_MODELS, make_calibration_batches

BATCHES = 8
WORKERS = 2
SECONDS_PER_BATCH = 60
SECONDS_PER_KIND = 15


def _export(root: Path, shards: bool) -> Path:
    model = TINY_MODELS["llama"](0)
    quantport.quantize(model, "fp8", make_calibration_batches(), progress=False)
    out = root / ("sharded" if shards else "single")
    quantport.export(model, out, format="modelopt", progress=False, max_shard_size="150KB" if shards else "5GB")
    return out


@pytest.fixture(scope="session")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Kind id -> {command -> {code, stdout, stderr}}, or {"error": why the child gave no result}."""
    root = tmp_path_factory.mktemp("hostile")
    bases = {"single": _export(root, False), "sharded": _export(root, True)}
    assert (bases["single"] / "model.safetensors").is_file()
    assert (bases["sharded"] / "model.safetensors.index.json").is_file()
    jobs = []
    for kind in KINDS:
        directory = make(kind, bases, root / "kinds")
        jobs.append(
            {"id": kind.id, "dir": str(directory), "inject": str(directory / kind.inject) if kind.inject else None}
        )
    batches = [jobs[i::BATCHES] for i in range(BATCHES)]

    def run(batch: list[dict[str, Any]]) -> dict[str, Any]:
        start = time.monotonic()
        try:
            done = run_batch(batch, SECONDS_PER_BATCH + SECONDS_PER_KIND * len(batch))
        except Exception as exc:  # TimeoutExpired: a command hung or crawled
            return {job["id"]: {"error": f"{type(exc).__name__}: {exc}"} for job in batch}
        try:
            results = json.loads(done.stdout)
        except json.JSONDecodeError:
            why = f"child exited {done.returncode} after {time.monotonic() - start:.0f} s: {done.stderr[-2000:]}"
            return {job["id"]: {"error": why} for job in batch}
        return results

    with ThreadPoolExecutor(WORKERS) as pool:
        merged: dict[str, Any] = {}
        for part in pool.map(run, batches):
            merged.update(part)
    return merged


def _no_traceback(result: dict[str, Any]) -> None:
    for command, out in result.items():
        text = out["stdout"] + out["stderr"]
        assert "Traceback" not in text and out["code"] != 99, f"{command}:\n{text}"


def _check(kind: Kind, out: dict[str, Any]) -> None:
    report = json.loads(out["stdout"])
    rules = report["summary"]["by_rule"]
    assert kind.rule in rules, report
    assert "check.internal-error" not in rules, report
    expected = 0 if RULES[kind.rule].severity is Severity.WARNING and report["summary"]["errors"] == 0 else 1
    assert out["code"] == expected, report
    hits = [f for f in report["findings"] if f["rule"] == kind.rule]
    assert any(kind.names in f["target"] + f["message"] for f in hits), hits


def _error_line(out: dict[str, Any], names: str) -> None:
    assert out["stderr"].startswith("error: "), out["stderr"]
    assert names in out["stderr"], out["stderr"]


@pytest.mark.parametrize("kind", KINDS, ids=[k.id for k in KINDS])
def test_hostile_checkpoint_is_refused_cleanly(kind: Kind, outcomes: dict[str, Any]) -> None:
    result = outcomes[kind.id]
    assert "error" not in result, result.get("error")
    _no_traceback(result)
    _check(kind, result["check"])
    inspect = result["inspect"]
    assert inspect["code"] in (0, 1, 2), inspect
    if inspect["code"]:
        assert inspect["stderr"].startswith("error: "), inspect
    load = result["load"]
    if kind.loads and load["code"] == 0:
        return
    assert load["code"] == 2, load
    _error_line(load, kind.names)


def test_at_least_forty_kinds_with_distinct_ids() -> None:
    assert len(KINDS) >= 40
    assert len({k.id for k in KINDS}) == len(KINDS)
    assert all(k.rule in RULES for k in KINDS)
