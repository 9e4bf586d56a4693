"""Statistics as data: one calibration, every format (issue 12, part 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quantport
from moe_models import VOCAB, tiny_moe
from quantport.calibration_statistics import apply_statistics, load_statistics, save_statistics
from quantport.cli import main
from quantport.errors import InvalidArgumentError
from quantport.loading import load_model, resolve_model_dir
from quantport.sequential import open_layer_by_layer
from quantport.state import state_of
from sequential_checkpoints import differences
from tiny_models import make_calibration_batches

BATCHES = make_calibration_batches(vocab_size=VOCAB, n=3, batch=2, seq=16)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("qwen3_moe")
    tiny_moe("qwen3_moe").save_pretrained(directory)
    return directory


def _calibrated(directory: Path, fmt: str) -> torch.nn.Module:
    model, _ = load_model(directory, device="cpu", progress=False)
    return quantport.quantize(model, "nvfp4", BATCHES, format=fmt, kv_cache="fp8", progress=False)


@pytest.mark.parametrize("layer_by_layer", [False, True])
def test_one_calibration_exports_both_nvfp4_formats(tmp_path: Path, moe_dir: Path, layer_by_layer: bool) -> None:
    """NVFP4's global scale differs per format (amax/2688 vs its reciprocal); statistics saved from a ModelOpt
    calibration give compressed-tensors bytes equal to a compressed-tensors calibration."""
    save_statistics(_calibrated(moe_dir, "modelopt"), tmp_path / "stats.safetensors")
    direct = _calibrated(moe_dir, "compressed-tensors")
    quantport.export(direct, tmp_path / "direct", "compressed-tensors", progress=False)
    fresh = open_layer_by_layer(moe_dir) if layer_by_layer else load_model(moe_dir, device="cpu", progress=False)[0]
    apply_statistics(fresh, tmp_path / "stats.safetensors", "compressed-tensors")
    quantport.export(fresh, tmp_path / "from-stats", "compressed-tensors", progress=False)
    assert differences(tmp_path / "direct", tmp_path / "from-stats") == []


def test_statistics_hold_every_quantizer(tmp_path: Path, moe_dir: Path) -> None:
    model = _calibrated(moe_dir, "modelopt")
    stats = load_statistics(save_statistics(model, tmp_path / "s.safetensors"))
    state = state_of(model)
    assert stats.record["quantized"] == state.quantized and stats.record["experts"] == state.experts
    name = state.experts[0]
    quantizer = dict(model.named_modules())[name]._quantport_experts
    assert torch.equal(stats.tensors[f"experts/{name}/tokens"], quantizer.tokens)
    assert int(stats.tensors[f"experts/{name}/tokens"].sum()) == 3 * 2 * 16 * 2  # every token to top-2 experts
    kv = state.kv_modules[0]
    assert stats.tensors[f"kv/{kv}/k_amax"].item() > 0
    fresh, _ = load_model(moe_dir, device="cpu", progress=False)
    restored = state_of(apply_statistics(fresh, stats, "modelopt"))
    assert restored.coverage.to_json() == state.coverage.to_json()
    assert restored.excluded == state.excluded and [g.fused_name for g in restored.groups] == stats.record["groups"]


def test_refuses_what_it_cannot_hold(tmp_path: Path, moe_dir: Path) -> None:
    model, _ = load_model(resolve_model_dir("bundled:tiny-llama"), device="cpu", progress=False)
    quantport.quantize(model, "w4a16", progress=False, algorithm="gptq", calib_samples=4, calib_seq_len=64)
    with pytest.raises(InvalidArgumentError, match="changes weights"):
        save_statistics(model, tmp_path / "s.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidArgumentError, match="not a quantport statistics file"):
        load_statistics(tmp_path / "bad.safetensors")
    save_statistics(_calibrated(moe_dir, "modelopt"), tmp_path / "moe.safetensors")
    llama, _ = load_model(resolve_model_dir("bundled:tiny-llama"), device="cpu", progress=False)
    with pytest.raises(InvalidArgumentError, match="qwen3_moe model, not llama"):
        apply_statistics(llama, tmp_path / "moe.safetensors")


def test_cli_export_from_statistics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--recipe", "fp8", "--quiet", "--calib-samples", "4", "--calib-seq-len", "64"]
    stats = tmp_path / "s.safetensors"
    assert main(["quantize", "bundled:tiny-llama", str(tmp_path / "a"), *common, "--save-statistics", str(stats)]) == 0
    assert main(["export", "bundled:tiny-llama", str(stats), str(tmp_path / "b"), "--sequential", "--quiet"]) == 0
    assert "layer-by-layer (--sequential)" in capsys.readouterr().out
    assert differences(tmp_path / "a", tmp_path / "b") == []
    assert main(["export", "bundled:tiny-llama", str(tmp_path / "none"), str(tmp_path / "c")]) == 2
    assert main(["quantize", "bundled:tiny-llama", str(tmp_path / "d"), *common, "--algorithm", "gptq",
                 "--save-statistics", str(stats)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "statistics file" in err and "also changes weights" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
