"""Tiny checkpoints written in the published FP8-block (DeepSeek-V3) and MXFP4 (GPT-OSS) layouts.

The quantizers here are written from the formats' definitions, independently of quantport.sources:

* FP8 block (DeepSeek-V3's ``inference/kernel.py`` convention): per 128x128 block ``weight_scale_inv =
  amax / 448`` (fp32, grid ``[ceil(out/128), ceil(in/128)]``) and codes ``clamp(w / scale_inv)`` in
  float8_e4m3fn. Every 2-D Linear weight of a decoder layer is FP8 except the router ``mlp.gate``.
* MXFP4 (OpenAI's GPT-OSS release): the expert tensor stored ``[E, out, in]`` (the module's ``[E, in, out]``
  transposed), groups of 32 along ``in`` share an E8M0 exponent byte ``e + 127``; each value is the nearest
  E2M1 code of ``x / 2**e``, two codes a byte, the even element in the low nibble.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GptOssConfig, GptOssForCausalLM
from transformers.core_model_loading import revert_weight_conversion

FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def deepseek_config(*, divisible: bool) -> DeepseekV3Config:
    """A 2-layer DeepSeek-V3 (layer 0 dense, layer 1 MoE with 4 experts + 1 shared expert).

    ``divisible``: every Linear a multiple of 128 (transformers 5.24's FP8 loader needs it); otherwise
    ``kv_a_proj_with_mqa`` has 96 rows (one partial block), like the real model's 576.
    """
    heads_dims = (
        dict(kv_lora_rank=128, qk_rope_head_dim=128, qk_nope_head_dim=128, v_head_dim=128)
        if divisible
        else dict(kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64)
    )
    config = DeepseekV3Config(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=384,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        q_lora_rank=128,
        max_position_embeddings=128,
        **heads_dims,
    )
    config.architectures = ["DeepseekV3ForCausalLM"]
    config.dtype = torch.bfloat16
    return config


def gpt_oss_config() -> GptOssConfig:
    """A 2-layer GPT-OSS: hidden 64 (2 MXFP4 groups), expert intermediate 32 (1 group), 4 experts."""
    config = GptOssConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        layer_types=["full_attention"] * 2,
    )
    config.architectures = ["GptOssForCausalLM"]
    config.dtype = torch.bfloat16
    return config


def hub_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` would write, under their checkpoint names (tied weights once)."""
    seen: set[int] = set()
    unique = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            unique[name] = tensor
    return {name: t.contiguous() for name, t in revert_weight_conversion(model, unique).items()}


def bf16_model(config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = (DeepseekV3ForCausalLM if isinstance(config, DeepseekV3Config) else GptOssForCausalLM)(config)
    return model.to(torch.bfloat16).eval()


def is_deepseek_fp8(name: str, tensor: torch.Tensor) -> bool:
    return (
        tensor.ndim == 2
        and name.startswith("model.layers.")
        and name.endswith(".weight")
        and "_proj" in name.rsplit(".", 2)[-2]  # q_a_proj ... kv_a_proj_with_mqa, experts' gate/up/down_proj
    )


def fp8_block_quantize(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn codes, fp32 weight_scale_inv) of a 2-D weight, partial last blocks allowed."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block), math.ceil(cols / block))
    padded = torch.zeros(grid[0] * block, grid[1] * block)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(grid[0], block, grid[1], block)
    scale_inv = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)
    codes = (blocks / scale_inv[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes.view(grid[0] * block, grid[1] * block)[:rows, :cols].contiguous(), scale_inv


def mxfp4_quantize(module_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [E, out, in/32, 16], scales uint8 [E, out, in/32]) of a module tensor [E, in, out]."""
    stored = module_tensor.float().transpose(1, 2).contiguous()
    experts, rows, cols = stored.shape
    groups = stored.view(experts, rows, cols // 32, 32)
    amax = groups.abs().amax(dim=-1).clamp(min=2.0**-100)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    codes = (scaled[..., None] - E2M1).abs().argmin(dim=-1).to(torch.uint8)  # nearest value; ties to the lower code
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (exponent + 127).to(torch.uint8)


def write_checkpoint(directory: Path, config, tensors: dict[str, torch.Tensor], quant: dict | None) -> Path:
    """``tensors`` split over two shards with an index, and config.json with ``quant`` as quantization_config."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for file, chunk in (
        ("model-00001-of-00002.safetensors", names[:half]),
        ("model-00002-of-00002.safetensors", names[half:]),
    ):
        save_file({n: tensors[n] for n in chunk}, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(directory)
    if quant is not None:
        written = json.loads((directory / "config.json").read_text())
        written["quantization_config"] = quant
        (directory / "config.json").write_text(json.dumps(written, indent=2))
    return directory


def write_fp8_checkpoint(directory: Path, *, divisible: bool, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A DeepSeek-V3 FP8-block checkpoint and the bf16 hub tensors it was quantized from."""
    config = deepseek_config(divisible=divisible)
    original = hub_state_dict(bf16_model(config, seed))
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in original.items():
        if is_deepseek_fp8(name, tensor):
            stored[name], stored[name + "_scale_inv"] = fp8_block_quantize(tensor)
        else:
            stored[name] = tensor
    return write_checkpoint(directory, config, stored, FP8_CONFIG), original


def write_mxfp4_checkpoint(directory: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A GPT-OSS MXFP4 checkpoint and the bf16 hub tensors it was quantized from."""
    config = gpt_oss_config()
    original = hub_state_dict(bf16_model(config, seed))
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in original.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored[name + "_blocks"], stored[name + "_scales"] = mxfp4_quantize(tensor)
        else:
            stored[name] = tensor
    return write_checkpoint(directory, config, stored, MXFP4_CONFIG), original
