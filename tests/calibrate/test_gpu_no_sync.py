"""The calibration forward adds no host synchronisation to the model's own forward (CUDA only).

PyTorch's sync debug mode warns at every operation that makes the host wait for the GPU (``.item()``,
``.tolist()``, ``bincount`` sizing, boolean indexing, ...). The statistics of calibration (dense-layer
amax, per-expert token counts and amax, KV amax) must stay on the device, so a calibration forward must
warn exactly as often as the same model's plain forward (transformers may synchronise on its own).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import quantport
from moe_models import tiny_moe
from quantport.modules.quant_linear import QuantMode
from quantport.state import set_mode
from tiny_models import _tiny_llama, make_calibration_batches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _synchronisations(model, batch) -> int:
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gpt_oss", "mixtral", "llama4_text"])
@pytest.mark.parametrize("recipe", ["fp8", "nvfp4"])
def test_calibration_forward_adds_no_host_synchronisation(family, recipe):
    model = (_tiny_llama() if family == "llama" else tiny_moe(family)).cuda()
    vocab = model.config.get_text_config().vocab_size
    batches = [b.cuda() for b in make_calibration_batches(vocab_size=vocab, n=2)]
    quantport.quantize(model, recipe, calib_data=batches[:1], kv_cache="fp8", progress=False)
    set_mode(model, QuantMode.OFF)
    _synchronisations(model, batches[1])  # warm-up: lazy initialisation may synchronise once
    plain = _synchronisations(model, batches[1])
    set_mode(model, QuantMode.CALIBRATE)
    _synchronisations(model, batches[1])
    calibrating = _synchronisations(model, batches[1])
    set_mode(model, QuantMode.OFF)
    assert calibrating == plain, f"calibration forward: {calibrating} host synchronisations, plain: {plain}"
