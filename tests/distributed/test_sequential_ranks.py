"""Layer by layer under torchrun (gloo, CPU): the checkpoint is byte-identical to one layer-by-layer process.

Each rank keeps the hidden states of its own batches, every decoder layer's statistics are reduced over the
ranks before the next layer, and each rank writes the shard files ``i`` with ``i % world_size == rank``
(small shards, so that every rank writes some); rank 0 writes the index, the configs and the report. The
report's ``run`` section (this process's memory peaks) is the only difference allowed. A rank that fails
in a decoder layer, or while it writes its shards, makes every rank exit 2 with the same one-line error,
and neither OUT nor a staging directory is left.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_models import tiny_moe
from rank_launch import SEQUENTIAL_WORKER, run_plain, run_ranks
from sequential_checkpoints import differences
from tiny_models import TINY_MODELS

DENSE = ["dense-fp8-kv", "dense-nvfp4", "dense-w4a16-kv", "dense-w4a16", "dense-fp8-two-batches"]
MOE = ["moe-fp8", "moe-nvfp4", "moe-w4a16-nvfp4", "moe-nvfp4-propagate-quantized"]
SHARD_SIZE = "64KB"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    TINY_MODELS["llama"](0).save_pretrained(root / "llama")
    tiny_moe("qwen3_moe").save_pretrained(root / "qwen3_moe")
    return root


def _spec(tmp: Path, models: Path, name: str, cases: list[str], **extra) -> str:
    path = tmp / f"{name}.json"
    spec = {"models": str(models), "out": str(tmp / name), "cases": cases, "max_shard_size": SHARD_SIZE, **extra}
    path.write_text(json.dumps(spec))
    return str(path)


@pytest.fixture(scope="module")
def reference(models: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("plain")
    result = run_plain([str(SEQUENTIAL_WORKER), _spec(tmp, models, "plain", DENSE + MOE)], timeout=300)
    assert result.returncode == 0, result.stderr
    return tmp / "plain"


def _shards(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("world_size", "cases"), [(1, ["dense-fp8-kv", "moe-nvfp4"]), (2, DENSE + MOE), (3, DENSE + MOE)]
)
def test_layer_by_layer_checkpoint_is_byte_identical_to_one_process(
    models: Path, reference: Path, tmp_path: Path, world_size: int, cases: list[str]
):
    record = tmp_path / "record"
    record.mkdir()
    spec = _spec(tmp_path, models, "ranks", cases, record=str(record))
    results = run_ranks([str(SEQUENTIAL_WORKER), spec], world_size, timeout=300)
    for result in results:
        assert result.returncode == 0, f"rank {result.rank}: {result.stderr}"
    for case in cases:
        assert differences(reference / case, tmp_path / "ranks" / case) == [], case
        shards = _shards(reference / case)
        assert len(shards) >= 2, case
        for rank in range(world_size):  # shard i written by rank i % world_size, by that rank only
            written = json.loads((record / f"{rank}.json").read_text())[case]
            assert written == [s for i, s in enumerate(shards) if i % world_size == rank], (case, rank)
    report = json.loads((tmp_path / "ranks" / "dense-fp8-kv" / "quantport_report.json").read_text())
    assert report["calibration_tokens"] == 5 * 2 * 16  # every rank's tokens, summed
    assert report["run"]["path"] == "layer-by-layer"
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == sorted(cases)  # nothing else


def test_rank_zero_writes_every_shard_when_a_rank_cannot_see_the_staging_directory(
    models: Path, reference: Path, tmp_path: Path
):
    record = tmp_path / "record"
    record.mkdir()
    spec = _spec(tmp_path, models, "ranks", ["moe-nvfp4"], record=str(record), blind_rank=1)
    results = run_ranks([str(SEQUENTIAL_WORKER), spec], 2, timeout=300)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert differences(reference / "moe-nvfp4", tmp_path / "ranks" / "moe-nvfp4") == []
    assert json.loads((record / "0.json").read_text())["moe-nvfp4"] == _shards(reference / "moe-nvfp4")
    assert json.loads((record / "1.json").read_text())["moe-nvfp4"] == []
    assert "do not see the staging directory" in results[0].stderr


WRITE_FAILED = (
    "export: cannot write the checkpoint to {out}: injected failure while writing shards; check the output "
    "location, or choose another OUT"
)


@pytest.mark.parametrize(
    ("rank", "at", "message"),
    [
        (1, "layer", "quantize: RuntimeError: injected failure in decoder layer 1"),
        (1, "export", WRITE_FAILED),
        (0, "export", WRITE_FAILED),  # rank 0 waits for rank 1 to stop writing before it removes the staging
    ],
)
def test_a_failing_rank_stops_every_rank_and_nothing_is_written(
    models: Path, tmp_path: Path, rank: int, at: str, message: str
):
    spec = _spec(tmp_path, models, "out", ["dense-fp8-kv"], fail={"rank": rank, "at": at})
    results = run_ranks([str(SEQUENTIAL_WORKER), spec], 2, timeout=300)
    assert [r.returncode for r in results] == [2, 2], [r.stderr for r in results]
    lines = [r.error_lines() for r in results]
    assert lines[0] == lines[1], lines
    message = message.format(out=tmp_path / "out" / "dense-fp8-kv")
    assert lines[0] == [f"error: rank {rank} of 2 failed in {message} (every rank stopped; nothing was written)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no OUT, no staging directory


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("world_size", [1, 2])
def test_nccl_ranks_layer_by_layer_write_the_bytes_of_one_gpu_process(models: Path, tmp_path: Path, world_size: int):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    cases = ["dense-fp8-kv", "dense-nvfp4", "moe-nvfp4"]
    plain = run_plain([str(SEQUENTIAL_WORKER), _spec(tmp_path, models, "plain", cases, device="cuda")], timeout=300)
    assert plain.returncode == 0, plain.stderr
    spec = _spec(tmp_path, models, "ranks", cases, device="cuda")
    results = run_ranks([str(SEQUENTIAL_WORKER), spec], world_size, timeout=300)
    for result in results:
        assert result.returncode == 0, f"rank {result.rank}: {result.stderr}"
    for case in cases:
        assert differences(tmp_path / "plain" / case, tmp_path / "ranks" / case) == [], case
