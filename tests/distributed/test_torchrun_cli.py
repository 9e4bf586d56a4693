"""``torchrun --nproc-per-node N -m quantport quantize ...`` on CPU ranks (gloo).

Two ranks write the same bytes as ``python -m quantport quantize`` in one process; only rank 0 prints the
summary. When OUT cannot be claimed on rank 0 (it exists and is not empty), every rank exits 2 with the same
one-line error and OUT is left as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rank_launch import SRC, run_plain, run_ranks, tree_bytes

ARGS = ["--recipe", "fp8", "--kv-cache", "fp8", "--device", "cpu", "--calib-samples", "6", "--calib-seq-len", "32"]
ARGS += ["--calib-batch-size", "2", "--quiet"]


def _quantize(out: Path) -> list[str]:
    return ["-m", "quantport", "quantize", "bundled:tiny-llama", str(out), *ARGS]


def test_torchrun_two_ranks_write_the_bytes_of_one_process(tmp_path: Path):
    plain = run_plain(_quantize(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*torchrun, *_quantize(tmp_path / "ranks")], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("quantport: fp8 (modelopt)") == 1  # the summary, from rank 0 only
    assert "calibration      : 192 tokens" in done.stdout  # 6 x 32, over both ranks
    expected, written = tree_bytes(tmp_path / "plain"), tree_bytes(tmp_path / "ranks")
    assert "tokenizer.json" in written and sorted(written) == sorted(expected)
    assert [name for name in expected if written[name] != expected[name]] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "ranks"]


def test_rank_zero_refusing_out_stops_every_rank(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    results = run_ranks(_quantize(out), 2)
    assert [r.returncode for r in results] == [2, 2], [r.stderr for r in results]
    (line,) = results[0].error_lines()
    assert results[1].error_lines() == [line]
    assert line.startswith("error: rank 0 of 2 failed in quantize command: output directory ")
    assert "exists and is not empty; choose another path or pass --overwrite" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert tree_bytes(out) == {"keep.txt": b"mine"}


def test_torchrun_layer_by_layer_ranks_write_the_bytes_of_one_process(tmp_path: Path):
    """``--sequential``: each rank calibrates its batches layer by layer and writes its share of the shards."""
    from sequential_checkpoints import differences

    args = ["--sequential", "--max-shard-size", "200KB", "--recipe", "nvfp4"]
    plain = run_plain([*_quantize(tmp_path / "plain"), *args])
    assert plain.returncode == 0, plain.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*torchrun, *_quantize(tmp_path / "ranks"), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("path             : layer-by-layer (--sequential)") == 1  # rank 0's summary
    assert "calibration      : 192 tokens" in done.stdout
    assert len(list((tmp_path / "plain").glob("model-*.safetensors"))) == 2  # one shard file per rank
    assert differences(tmp_path / "plain", tmp_path / "ranks") == []  # all but the report's memory peaks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "ranks"]
