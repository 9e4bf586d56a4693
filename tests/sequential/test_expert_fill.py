"""Which checkpoint keys fill fused expert parameters piece by piece, and what a wrong checkpoint gives."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

from moe_models import EXPERTS, tiny_moe
from quantport.errors import MissingWeightsError
from quantport.sequential import open_layer_by_layer
from quantport.sequential.expert_fill import ExpertPiece, Part, expert_layouts, plan_expert_reads

EXPERTS_NAME = "model.layers.0.mlp.experts"


def _meta(family: str) -> torch.nn.Module:
    with torch.device("meta"):
        return tiny_moe(family)


def _per_expert_keys(leaves=("gate_proj", "up_proj", "down_proj")) -> list[str]:
    return [f"{EXPERTS_NAME}.{e}.{leaf}.weight" for e in range(EXPERTS) for leaf in leaves]


def test_per_expert_keys_become_pieces_and_the_rest_stays():
    model = _meta("qwen3_moe")
    mapping = get_model_conversion_mapping(model, None, None)
    other = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate.weight"]
    reads = plan_expert_reads([*_per_expert_keys(), *other], model, mapping, expert_layouts(model), rows=True)
    assert reads.rest == other
    gate_up = reads.pieces[f"{EXPERTS_NAME}.gate_up_proj"]
    assert ExpertPiece(f"{EXPERTS_NAME}.3.up_proj.weight", 3, Part.UP) in gate_up and len(gate_up) == 2 * EXPERTS
    assert {p.part for p in reads.pieces[f"{EXPERTS_NAME}.down_proj"]} == {Part.DOWN}


def test_mixtral_leaf_names_come_from_the_layout():
    model = _meta("mixtral")
    keys = [k.replace(".mlp.", ".block_sparse_moe.") for k in _per_expert_keys(("w1", "w3", "w2"))]
    mapping = get_model_conversion_mapping(model, None, None)
    reads = plan_expert_reads(keys, model, mapping, expert_layouts(model), rows=False)
    assert reads.rest == []
    assert ExpertPiece(keys[1], 0, Part.UP) in reads.pieces[f"{EXPERTS_NAME}.gate_up_proj"]


def test_other_conversions_and_disagreeing_layouts_are_left_to_transformers():
    model = _meta("qwen3_moe")
    keys = _per_expert_keys()
    layouts = expert_layouts(model)
    other_ops = WeightConverter(
        ["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
        "mlp.experts.gate_up_proj",
        operations=[MergeModulelist(dim=0), Concatenate(dim=2)],
    )
    down = get_model_conversion_mapping(model, None, None)[1]
    reads = plan_expert_reads(keys, model, [other_ops, down], layouts, rows=True)
    assert sorted(reads.rest) == sorted(k for k in keys if "down_proj" not in k)
    transposed = {name: replace(layout, transposed=True) for name, layout in layouts.items()}
    mapping = get_model_conversion_mapping(model, None, None)
    assert plan_expert_reads(keys, model, mapping, transposed, rows=True).rest == keys
    assert plan_expert_reads(keys, model, mapping, {}, rows=True).rest == keys  # experts without a layout


def test_a_parameter_with_one_unplaceable_key_is_left_whole_to_transformers():
    model = _meta("qwen3_moe")
    keys = [*_per_expert_keys(), f"{EXPERTS_NAME}.x.down_proj.weight"]  # no expert number: transformers decides
    mapping = get_model_conversion_mapping(model, None, None)
    reads = plan_expert_reads(keys, model, mapping, expert_layouts(model), rows=True)
    assert list(reads.pieces) == [f"{EXPERTS_NAME}.gate_up_proj"]
    assert reads.rest == [k for k in keys if "down_proj" in k]


def test_fused_tensors_stored_whole_are_read_by_rows_only_from_a_row_source():
    model = _meta("gpt_oss")
    keys = [f"{EXPERTS_NAME}.gate_up_proj", f"{EXPERTS_NAME}.gate_up_proj_bias"]
    mapping = get_model_conversion_mapping(model, None, None)
    layouts = expert_layouts(model)
    reads = plan_expert_reads(keys, model, mapping, layouts, rows=True)
    assert reads.rest == keys[1:] and reads.pieces[keys[0]] == [ExpertPiece(keys[0])]  # biases are 2-D: as before
    assert plan_expert_reads(keys, model, mapping, layouts, rows=False).rest == keys


def _without(directory: Path, out: Path, drop: str) -> Path:
    out.mkdir()
    for file in directory.iterdir():
        if file.suffix == ".safetensors":
            tensors = {k: v for k, v in load_file(file).items() if k != drop}
            save_file(tensors, str(out / file.name), metadata={"format": "pt"})
        elif file.suffix == ".json" and file.name != "model.safetensors.index.json":
            (out / file.name).write_text(file.read_text())
    return out


def test_a_missing_expert_is_named(tmp_path: Path):
    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "model")
    directory = _without(tmp_path / "model", tmp_path / "broken", "model.layers.1.mlp.experts.2.up_proj.weight")
    store = open_layer_by_layer(directory).__dict__["_quantport_layer_store"]
    store.load(0)
    with pytest.raises(MissingWeightsError, match=r"gate_up_proj \(4 experts\).*missing expert 2 up"):
        store.load(1)


def test_a_wrong_expert_shape_is_refused(tmp_path: Path):
    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "model")
    file = next((tmp_path / "model").glob("*.safetensors"))
    tensors = load_file(file)
    name = "model.layers.1.mlp.experts.1.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})
    store = open_layer_by_layer(tmp_path / "model").__dict__["_quantport_layer_store"]
    with pytest.raises(MissingWeightsError, match=r"experts.1.down_proj.weight has shape \[64, 31\]"):
        store.load(1)
