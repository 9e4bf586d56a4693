"""FP8-block and MXFP4 checkpoints requantized layer by layer, without a bf16 copy (issue 12, part 5).

The reference: the same weights dequantized (quantport.sources, bit-equal to transformers' own
dequantization, tests/sources) written as a bf16 checkpoint and quantized whole. The layer-by-layer run
from the quantized checkpoint must write the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

import quantport
from quantport.cli import main
from quantport.loading import load_model
from quantport.sequential import open_layer_by_layer
from quantport.sources import open_source
from sequential_checkpoints import differences
from sources.published_layouts import write_checkpoint, write_fp8_checkpoint, write_mxfp4_checkpoint
from tiny_models import make_calibration_batches

BATCHES = make_calibration_batches(vocab_size=256, n=2, batch=2, seq=16)


def _dequantized_copy(quantized: Path, directory: Path) -> Path:
    """What the whole-model path needs: the dequantized tensors as a plain bf16 checkpoint (test only)."""
    source = open_source(quantized)
    tensors = source.read(list(source.tensors()), "cpu")
    config = AutoConfig.from_pretrained(quantized)
    del config.quantization_config
    return write_checkpoint(directory, config, tensors, None)


@pytest.mark.parametrize(
    ("write", "recipe", "fmt"),
    [
        (lambda d: write_fp8_checkpoint(d, divisible=False)[0], "nvfp4", None),
        (lambda d: write_fp8_checkpoint(d, divisible=True)[0], "fp8", "compressed-tensors"),
        (lambda d: write_mxfp4_checkpoint(d)[0], "mxfp4-experts", "mxfp4"),
    ],
    ids=["deepseek-fp8-block-to-nvfp4", "deepseek-fp8-block-to-fp8-ct", "gpt-oss-mxfp4-to-mxfp4"],
)
def test_requantized_layer_by_layer_equals_whole_model_of_dequantized_weights(tmp_path: Path, write, recipe, fmt):
    quantized = write(tmp_path / "quantized")
    plain = _dequantized_copy(quantized, tmp_path / "bf16")
    whole, _ = load_model(plain, device="cpu", progress=False)
    quantport.quantize(whole, recipe, BATCHES, format=fmt, progress=False)
    quantport.export(whole, tmp_path / "whole", fmt, progress=False)
    sequential = open_layer_by_layer(quantized)
    quantport.quantize(sequential, recipe, BATCHES, format=fmt, progress=False)
    quantport.export(sequential, tmp_path / "sequential", fmt, progress=False)
    found = differences(tmp_path / "whole", tmp_path / "sequential")
    # the source's config.json names its own quantization_config: everything else must be equal
    assert found in ([], ["config.json"])
    if found:
        left, right = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("whole", "sequential"))
        assert {k: v for k, v in left.items() if left.get(k) != right.get(k)} == {}


def test_cli_reads_fp8_block_checkpoints_layer_by_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quantized, _ = write_fp8_checkpoint(tmp_path / "quantized", divisible=False)
    args = ["quantize", str(quantized), str(tmp_path / "out"), "--recipe", "fp8", "--quiet"]
    assert main([*args, "--no-sequential"]) == 2
    assert "fp8-quantized: quantport reads it only layer by layer" in capsys.readouterr().err
    # no tokenizer in the tiny checkpoint: a weight-only recipe needs no calibration text
    w4a16 = ["quantize", str(quantized), str(tmp_path / "out"), "--recipe", "w4a16", "--calib-seq-len", "64"]
    assert main([*w4a16, "--quiet"]) == 0
    assert "layer-by-layer (the checkpoint is fp8-quantized" in capsys.readouterr().out
