"""Golden test: quantport and nvidia-modelopt 0.47 export the same checkpoint, tensor for tensor."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import quantport
from checkpoint_files import assert_matches_reference

mtq = pytest.importorskip("modelopt.torch.quantization")
export_hf_checkpoint = pytest.importorskip("modelopt.torch.export").export_hf_checkpoint

pytestmark = pytest.mark.reference

MODELOPT_CONFIGS = {"fp8": "FP8_DEFAULT_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}


def _reference_export(model, recipe: str, batches, out: Path, kv_cache: bool) -> None:
    config = getattr(mtq, MODELOPT_CONFIGS[recipe])
    if kv_cache:
        config = mtq.update_quant_cfg_with_kv_cache_quant(config, mtq.FP8_KV_CFG["quant_cfg"])

    def forward_loop(m):
        for batch in batches:
            m(batch)

    with torch.no_grad():
        mtq.quantize(model, config, forward_loop)
        export_hf_checkpoint(model, export_dir=out)


@pytest.mark.parametrize("kv_cache", [False, True], ids=["no-kv", "kv-fp8"])
@pytest.mark.parametrize("recipe", ["fp8", "nvfp4"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_matches_modelopt(tmp_path, tiny_model, calib_batches, family, recipe, kv_cache):
    model = tiny_model(family)
    reference_model = copy.deepcopy(model)
    _reference_export(reference_model, recipe, calib_batches, tmp_path / "ref", kv_cache)
    quantport.quantize(model, recipe, calib_batches, kv_cache="fp8" if kv_cache else None, progress=False)
    quantport.export(model, tmp_path / "ours", progress=False)

    assert_matches_reference(tmp_path / "ours", tmp_path / "ref")

    ref_flat = json.loads((tmp_path / "ref" / "config.json").read_text())["quantization_config"]
    our_flat = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    for key in ("quant_algo", "quant_method", "config_groups", "kv_cache_scheme", "producer"):
        assert our_flat.get(key) == ref_flat.get(key), key
    assert set(our_flat["ignore"]) == set(ref_flat["ignore"])
