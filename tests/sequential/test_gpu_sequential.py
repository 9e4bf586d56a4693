"""Layer by layer on a GPU: the same bytes as the whole model on that GPU, and one layer in memory at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quantport
from moe_models import VOCAB, tiny_moe
from quantport.loading import load_model
from quantport.sequential import open_layer_by_layer
from quantport.sequential.layer_store import LayerStore
from sequential_checkpoints import differences
from sources.published_layouts import write_fp8_checkpoint
from tiny_models import make_calibration_batches

pytestmark = pytest.mark.gpu

BATCHES = make_calibration_batches(vocab_size=VOCAB, n=3, batch=2, seq=16)


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.parametrize(("family", "recipe", "kv"), [("qwen3_moe", "nvfp4", "fp8"), ("deepseek_v3", "fp8", None)])
def test_gpu_layer_by_layer_equals_whole(tmp_path: Path, family: str, recipe: str, kv) -> None:
    tiny_moe(family).save_pretrained(tmp_path / "model")
    whole, _ = load_model(tmp_path / "model", device="cuda", progress=False)
    quantport.quantize(whole, recipe, BATCHES, kv_cache=kv, progress=False)
    quantport.export(whole, tmp_path / "whole", progress=False)
    sequential = open_layer_by_layer(tmp_path / "model", device="cuda")
    quantport.quantize(sequential, recipe, BATCHES, kv_cache=kv, progress=False)
    quantport.export(sequential, tmp_path / "sequential", progress=False)
    assert differences(tmp_path / "whole", tmp_path / "sequential") == []


def test_gpu_fp8_block_source_holds_one_layer_at_a_time(tmp_path: Path, monkeypatch) -> None:
    quantized, _ = write_fp8_checkpoint(tmp_path / "quantized", divisible=False)
    most = []
    load = LayerStore.load

    def counted(self, index):
        layer = load(self, index)
        most.append(len(self.loaded))
        return layer

    monkeypatch.setattr(LayerStore, "load", counted)
    model = open_layer_by_layer(quantized, device="cuda")
    batches = make_calibration_batches(vocab_size=256, n=2, batch=2, seq=16)
    quantport.quantize(model, "nvfp4", batches, progress=False)
    quantport.export(model, tmp_path / "out", progress=False)
    assert most and max(most) == 1
    assert (tmp_path / "out" / "model.safetensors").is_file()
