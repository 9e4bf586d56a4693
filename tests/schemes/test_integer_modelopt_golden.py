"""Golden test of the ModelOpt integer layouts: quantport and nvidia-modelopt 0.47 write the same tensors.

ModelOpt's ``INT4_AWQ_CFG`` runs with the ``max`` algorithm (round to nearest, like quantport's
``w4a16-modelopt``), and ``INT8_WEIGHT_ONLY_CFG`` as it is.
"""

from __future__ import annotations

import copy

import pytest
import torch

import quantport
from checkpoint_files import assert_matches_reference
from quantport.export import recipe_for_format

mtq = pytest.importorskip("modelopt.torch.quantization")
export_hf_checkpoint = pytest.importorskip("modelopt.torch.export").export_hf_checkpoint

pytestmark = pytest.mark.reference


@pytest.mark.parametrize(("recipe", "modelopt_config"), [("w4a16", "INT4_AWQ_CFG"), ("w8a16", "INT8_WEIGHT_ONLY_CFG")])
def test_matches_modelopt(tmp_path, tiny_model, calib_batches, recipe, modelopt_config):
    model = tiny_model("llama", hidden_size=256, intermediate_size=384, head_dim=64)
    reference = copy.deepcopy(model)
    config = copy.deepcopy(getattr(mtq, modelopt_config))
    config["algorithm"] = "max"
    with torch.no_grad():
        mtq.quantize(reference, config, lambda m: [m(batch) for batch in calib_batches])
        export_hf_checkpoint(reference, export_dir=tmp_path / "ref")
    quantport.quantize(model, recipe_for_format(recipe, "modelopt"), calib_batches, progress=False)
    quantport.export(model, tmp_path / "ours", progress=False)

    assert_matches_reference(tmp_path / "ours", tmp_path / "ref")
