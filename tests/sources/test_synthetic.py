"""SyntheticSource (deterministic tensors generated on the device) and model_tensor_infos (hub names of a config)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.integrations.finegrained_fp8 import Fp8Dequantize

from quantport.sources import (
    SourceFormat,
    SyntheticSource,
    TensorInfo,
    UnknownTensorError,
    WeightSource,
    dequantize_fp8_block,
    model_tensor_infos,
)
from sources.published_layouts import bf16_model, deepseek_config, gpt_oss_config, hub_state_dict


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def deepseek_infos() -> dict[str, TensorInfo]:
    return model_tensor_infos(deepseek_config(divisible=False))


def test_model_tensor_infos_are_the_checkpoint_names_shapes_and_dtypes(deepseek_infos):
    saved = hub_state_dict(bf16_model(deepseek_config(divisible=False)))
    assert {n: tuple(t.shape) for n, t in saved.items()} == {n: i.shape for n, i in deepseek_infos.items()}
    wide = {n for n, i in deepseek_infos.items() if i.dtype != torch.bfloat16}
    assert wide == {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"}
    assert all(deepseek_infos[n].dtype == torch.float32 for n in wide)  # transformers keeps the router in fp32
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in deepseek_infos  # per expert, as on the hub


def test_model_tensor_infos_keeps_gpt_oss_experts_fused_and_ties_once():
    infos = model_tensor_infos(gpt_oss_config())
    assert infos["model.layers.0.mlp.experts.gate_up_proj"] == TensorInfo((4, 64, 64), torch.bfloat16)
    assert infos["model.layers.0.mlp.experts.down_proj"] == TensorInfo((4, 32, 64), torch.bfloat16)
    tied = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    tied_infos = model_tensor_infos(tied, dtype=torch.float16)
    assert "lm_head.weight" not in tied_infos and tied_infos["model.embed_tokens.weight"].dtype == torch.float16


def test_tensors_match_what_read_returns(deepseek_infos):
    for fp8 in (False, True):
        source = SyntheticSource(deepseek_infos, seed=1, fp8_block=fp8)
        assert isinstance(source, WeightSource)
        assert source.format is (SourceFormat.FP8_BLOCK if fp8 else SourceFormat.PLAIN)
        assert source.tensors() == deepseek_infos
        read = source.read(reversed(list(deepseek_infos)), "cpu")
        assert list(read) == list(reversed(list(deepseek_infos)))
        for name, tensor in read.items():
            assert TensorInfo(tuple(tensor.shape), tensor.dtype) == deepseek_infos[name], name
            assert tensor.device.type == "cpu"


def test_reads_are_deterministic_per_name_and_seed(deepseek_infos):
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.experts.0.gate_proj.weight"]
    first = SyntheticSource(deepseek_infos, 7, True).read(names, "cpu")
    again = SyntheticSource(deepseek_infos, seed=7, fp8_block=True)
    for _ in range(2):
        second = again.read(names[::-1], "cpu")
        for name in names:
            assert torch.equal(bits(first[name]), bits(second[name])), name
    other_seed = SyntheticSource(deepseek_infos, seed=8, fp8_block=True).read(names, "cpu")
    assert not torch.equal(first[names[0]], other_seed[names[0]])
    other_expert = again.read(["model.layers.1.mlp.experts.1.gate_proj.weight"], "cpu")
    assert not torch.equal(first[names[1]], other_expert["model.layers.1.mlp.experts.1.gate_proj.weight"])


def test_magnitudes_are_realistic(deepseek_infos):
    source = SyntheticSource(deepseek_infos, seed=0)
    read = source.read(["model.layers.0.mlp.up_proj.weight", "model.norm.weight", "model.embed_tokens.weight"], "cpu")
    assert torch.equal(read["model.norm.weight"], torch.ones(256, dtype=torch.bfloat16))
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        assert abs(read[name].float().std().item() - 0.02) < 0.001
        assert abs(read[name].float().mean().item()) < 0.001


def test_fp8_selection_follows_deepseek_checkpoints(deepseek_infos):
    source = SyntheticSource(deepseek_infos, fp8_block=True)
    assert source.is_fp8("model.layers.1.self_attn.kv_a_proj_with_mqa.weight")
    assert source.is_fp8("model.layers.1.mlp.experts.3.down_proj.weight")
    assert source.is_fp8("model.layers.1.mlp.shared_experts.up_proj.weight")
    router = "model.layers.1.mlp.gate."
    norm = "model.layers.1.self_attn.kv_a_layernorm.weight"
    for plain in (
        router + "weight",
        router + "e_score_correction_bias",
        norm,
        "model.embed_tokens.weight",
        "lm_head.weight",
    ):
        assert not source.is_fp8(plain), plain
    assert not SyntheticSource(deepseek_infos).is_fp8("model.layers.1.mlp.experts.3.down_proj.weight")


@pytest.mark.parametrize(
    "name", ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
)
def test_fp8_tensors_are_codes_and_block_scales_dequantized(deepseek_infos, name):
    """As an FP8-block checkpoint holds them: e4m3 codes reaching 448 in every block, fp32 scales on the
    ceil grid, and the read tensor is their dequantization (transformers' where the blocks are whole)."""
    source = SyntheticSource(deepseek_infos, seed=3, fp8_block=True)
    codes, scale_inv = source.fp8_parts(name, "cpu")
    rows, cols = deepseek_infos[name].shape
    grid = (-(-rows // 128), -(-cols // 128))
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (rows, cols)
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == grid
    for r in range(grid[0]):
        for c in range(grid[1]):
            block = codes[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128].float()
            assert block.abs().max().item() == 448.0
    read = source.read([name], "cpu")[name]
    assert torch.equal(bits(read), bits(dequantize_fp8_block(codes, scale_inv, torch.bfloat16)))
    if rows % 128 == 0 and cols % 128 == 0:
        reference = Fp8Dequantize(None)._dequantize_one(codes, scale_inv, output_dtype=torch.bfloat16)
        assert torch.equal(bits(read), bits(reference))
    plain = SyntheticSource(deepseek_infos, seed=3).read([name], "cpu")[name].float()
    assert (read.float() - plain).norm() / plain.norm() < 0.05  # the FP8 rounding of the same normal draw


def test_unknown_names_raise(deepseek_infos):
    with pytest.raises(UnknownTensorError, match="not in the synthetic source"):
        SyntheticSource(deepseek_infos).read(["model.layers.9.mlp.up_proj.weight"], "cpu")


def test_integer_tensors_are_zeros():
    source = SyntheticSource({"position_ids": TensorInfo((4,), torch.int64)})
    assert torch.equal(source.read(["position_ids"], "cpu")["position_ids"], torch.zeros(4, dtype=torch.int64))


def test_reads_from_threads_give_the_same_bytes(deepseek_infos):
    from concurrent.futures import ThreadPoolExecutor

    source = SyntheticSource(deepseek_infos, 5, True)
    names = [n for n in deepseek_infos if ".layers.1.mlp.experts." in n]
    alone = source.read(names, "cpu")
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda n: source.read([n], "cpu")[n], names))
    for name, tensor in zip(names, together, strict=True):
        assert torch.equal(bits(tensor), bits(alone[name])), name
