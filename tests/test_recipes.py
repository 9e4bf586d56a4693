from __future__ import annotations

import pytest

from quantport.recipes import PRESETS, KVCacheFormat, LinearScheme, QuantRecipe, UnknownRecipeError, get_recipe


def test_presets_cover_the_required_recipes():
    assert {"fp8", "fp8-dynamic", "fp8-block", "nvfp4", "w4a16-nvfp4", "mxfp8"} <= set(PRESETS)
    assert get_recipe("nvfp4").scheme is LinearScheme.NVFP4
    assert get_recipe("fp8").kv_cache is KVCacheFormat.NONE


def test_unknown_recipe_names_the_choices():
    with pytest.raises(UnknownRecipeError, match="unknown recipe 'int3'.*fp8.*nvfp4"):
        get_recipe("int3")


@pytest.mark.parametrize(
    ("name", "excluded"),
    [
        ("lm_head", True),
        ("model.embed_tokens", True),
        ("model.layers.0.mlp.gate", True),
        ("model.layers.0.mlp.gate_proj", False),
        ("model.layers.0.feed_forward.router", True),
        ("model.layers.3.mlp.shared_expert_gate", True),
        ("model.layers.0.block_sparse_moe.gate", True),
        ("model.vision_tower.blocks.0.attn.qkv", True),
        ("model.layers.0.self_attn.q_proj", False),
    ],
)
def test_default_exclusions(name, excluded):
    assert get_recipe("fp8").is_excluded(name) is excluded


def test_options_add_user_patterns_and_kv_cache():
    recipe = get_recipe("fp8").with_options(kv_cache="fp8", extra_exclude=("*.o_proj",))
    assert recipe.kv_cache is KVCacheFormat.FP8
    assert recipe.is_excluded("model.layers.1.self_attn.o_proj")
    assert recipe.is_excluded("lm_head")
    assert not get_recipe("fp8").is_excluded("model.layers.1.self_attn.o_proj")


def test_recipe_rejects_loose_strings():
    with pytest.raises(ValueError, match="LinearScheme"):
        QuantRecipe("bad", "fp8")  # type: ignore[arg-type]
