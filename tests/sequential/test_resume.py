"""--resume: a layer-by-layer run killed after layer k goes on at layer k+1 and writes the same bytes (issue 12)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import quantport
from moe_models import VOCAB, tiny_moe
from quantport.errors import InvalidArgumentError
from quantport.export.output_dir import RESUME_DIR
from quantport.sequential import open_layer_by_layer
from quantport.sequential.layer_store import LayerStore
from sequential_checkpoints import differences
from tiny_models import make_calibration_batches

BATCHES = make_calibration_batches(vocab_size=VOCAB, n=3, batch=2, seq=16)


class _Killed(Exception):
    pass


def _run(model_dir: Path, resume_dir: Path, out: Path | None = None, **options) -> None:
    model = open_layer_by_layer(model_dir)
    quantport.quantize(model, "nvfp4", BATCHES, kv_cache="fp8", progress=False, resume_dir=resume_dir, **options)
    if out is not None:
        quantport.export(model, out, progress=False)


def test_resumed_run_skips_finished_layers_and_writes_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    model_dir = tmp_path / "model"
    tiny_moe("qwen3_moe").save_pretrained(model_dir)
    _run(model_dir, tmp_path / "straight-progress", tmp_path / "straight")

    load = LayerStore.load
    loaded: list[int] = []

    def killed_at_layer_1(self, index):
        if index == 1:
            raise _Killed
        loaded.append(index)
        return load(self, index)

    monkeypatch.setattr(LayerStore, "load", killed_at_layer_1)
    with pytest.raises(_Killed):
        _run(model_dir, tmp_path / "progress")
    assert loaded == [0] and (tmp_path / "progress" / "progress.json").is_file()

    def counted(self, index):
        loaded.append(index)
        return load(self, index)

    loaded.clear()
    monkeypatch.setattr(LayerStore, "load", counted)
    _run(model_dir, tmp_path / "progress", tmp_path / "resumed")
    assert loaded[0] == 1  # calibration read only layer 1; export then reads every layer
    assert differences(tmp_path / "straight", tmp_path / "resumed") == []


def test_progress_of_another_run_is_refused(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    tiny_moe("qwen3_moe").save_pretrained(model_dir)
    _run(model_dir, tmp_path / "progress")
    model = open_layer_by_layer(model_dir)
    other = make_calibration_batches(vocab_size=VOCAB, n=2, batch=2, seq=16)
    with pytest.raises(InvalidArgumentError, match="another recipe, model or calibration data"):
        quantport.quantize(model, "nvfp4", other, kv_cache="fp8", progress=False, resume_dir=tmp_path / "progress")


def test_cli_keeps_progress_after_a_kill_and_resumes(tmp_path: Path) -> None:
    """SIGKILL after the first layer (a child that dies in its second layer's read), then --resume."""
    args = ["quantize", "bundled:tiny-llama", str(tmp_path / "out"), "--recipe", "fp8", "--kv-cache", "fp8", "--quiet",
            "--calib-samples", "4", "--calib-seq-len", "64", "--calib-batch-size", "2"]  # fmt: skip
    dying = (
        "import os, signal, sys\n"
        "from quantport.sequential.layer_store import LayerStore\n"
        "load = LayerStore.load\n"
        "def load_or_die(self, index):\n"
        "    if index == 1: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return load(self, index)\n"
        "LayerStore.load = load_or_die\n"
        "from quantport.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    killed = subprocess.run([sys.executable, "-c", dying, *args, "--resume"], env=env, capture_output=True, text=True)
    assert killed.returncode == -9
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.quantport-staging")]
    assert len(leftovers) == 1 and (leftovers[0] / RESUME_DIR / "progress.json").is_file()
    run = [sys.executable, "-c", "import sys; from quantport.cli import main; raise SystemExit(main(sys.argv[1:]))"]
    resumed = subprocess.run([*run, *args, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run([*run, *args[:2], str(tmp_path / "straight"), *args[3:]], env=env, capture_output=True)
    assert straight.returncode == 0
    assert differences(tmp_path / "straight", tmp_path / "out") == []
    assert not any(p.name.startswith(".out.quantport-staging") for p in tmp_path.iterdir())
    assert not (tmp_path / "out" / RESUME_DIR).exists()
