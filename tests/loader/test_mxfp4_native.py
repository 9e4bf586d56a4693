"""quantport.load on gpt-oss's native MXFP4 checkpoints (``quant_method: mxfp4``) that quantport writes."""

from __future__ import annotations

import copy

import torch

import quantport
from moe_models import tiny_moe
from quantport.loader import load, load_report
from quantport.modules.quant_experts import experts_quantizer_of
from tiny_models import make_calibration_batches

BATCHES = make_calibration_batches(vocab_size=256)


def _export(tmp_path):
    model = tiny_moe("gpt_oss")
    copy.deepcopy(model).save_pretrained(tmp_path / "base")
    model = type(model).from_pretrained(tmp_path / "base", dtype="auto").eval()
    quantport.quantize(model, "mxfp4-experts", BATCHES, progress=False)
    return model, quantport.export(model, tmp_path / "out", format="mxfp4", progress=False)


def test_experts_decode_to_the_simulated_weights_and_logits(tmp_path):
    model, out = _export(tmp_path)

    loaded = load(out, simulate_activations=True)

    modules = dict(loaded.named_modules())
    experts = [(n, q) for n, m in model.named_modules() if (q := experts_quantizer_of(m)) is not None]
    assert len(experts) == 2
    for name, quantizer in experts:
        simulated = quantizer.simulated_parameters()
        assert torch.equal(modules[name].gate_up_proj, simulated["gate_up"]), name
        assert torch.equal(modules[name].down_proj, simulated["down"]), name
    report = load_report(loaded)
    assert report.dialect.dialect.value == "mxfp4" and report.unused_tensors == []
    assert [r.fused for r in report.experts] == [True, True] and report.dequantized == {}
    with torch.no_grad(), quantport.simulate(model):
        expected = model(BATCHES[0]).logits
    with torch.no_grad():
        assert torch.equal(loaded(BATCHES[0]).logits, expected)
