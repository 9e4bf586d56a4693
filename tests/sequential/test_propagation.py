"""--propagate quantized: each layer calibrated on the simulated quantized outputs of the one before."""

from __future__ import annotations

from pathlib import Path

import torch

import quantport
from moe_models import VOCAB, tiny_moe
from quantport.check import check_checkpoint
from quantport.modules.quant_linear import QuantLinear
from quantport.sequential import open_layer_by_layer
from tiny_models import make_calibration_batches

BATCHES = make_calibration_batches(vocab_size=VOCAB, n=3, batch=2, seq=16)


def _input_amax(model) -> dict[str, float]:
    return {n: float(m.input_amax) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_quantized_propagation_changes_only_later_layers(tmp_path: Path) -> None:
    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "model")
    runs = {}
    for propagate in ("unquantized", "quantized"):
        model = open_layer_by_layer(tmp_path / "model")
        quantport.quantize(model, "nvfp4", BATCHES, propagate=propagate, progress=False)
        quantport.export(model, tmp_path / propagate, progress=False)
        runs[propagate] = model
    plain, quantized = (_input_amax(runs[p]) for p in ("unquantized", "quantized"))
    first = {n: v for n, v in plain.items() if n.startswith("model.layers.0.")}
    assert first and all(quantized[n] == v for n, v in first.items())  # layer 0 sees the same embeddings
    later = [n for n in plain if n.startswith("model.layers.1.")]
    assert later and any(quantized[n] != plain[n] for n in later)
    # the simulation's weight copies are dropped with the layer's weights
    for module in runs["quantized"].modules():
        if isinstance(module, QuantLinear):
            assert module._simulated_weight is None
    assert check_checkpoint(tmp_path / "quantized").errors == []
    loaded = quantport.load(tmp_path / "quantized")
    assert torch.isfinite(loaded(input_ids=BATCHES[0]).logits).all()
