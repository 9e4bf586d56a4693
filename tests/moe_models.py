"""Tiny random MoE models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    Llama4Config,
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4TextConfig,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

HIDDEN, INTER, EXPERTS, VOCAB = 64, 32, 4, 256
COMMON = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)


def _llama4_text_config() -> Llama4TextConfig:
    return Llama4TextConfig(
        **COMMON,
        head_dim=16,
        intermediate_size=INTER,
        intermediate_size_mlp=INTER * 2,
        num_local_experts=EXPERTS,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        attention_chunk_size=128,
        moe_layers=[0, 1],
    )


def _build(family: str) -> torch.nn.Module:
    if family == "qwen3_moe":
        return Qwen3MoeForCausalLM(
            Qwen3MoeConfig(
                **COMMON,
                head_dim=16,
                moe_intermediate_size=INTER,
                intermediate_size=INTER * 2,
                num_experts=EXPERTS,
                num_experts_per_tok=2,
            )
        )
    if family == "qwen2_moe":
        return Qwen2MoeForCausalLM(
            Qwen2MoeConfig(
                **COMMON,
                moe_intermediate_size=INTER,
                shared_expert_intermediate_size=INTER * 2,
                intermediate_size=INTER * 2,
                num_experts=EXPERTS,
                num_experts_per_tok=2,
            )
        )
    if family == "mixtral":
        return MixtralForCausalLM(
            MixtralConfig(
                **COMMON, head_dim=16, intermediate_size=INTER, num_local_experts=EXPERTS, num_experts_per_tok=2
            )
        )
    if family == "deepseek_v3":
        return DeepseekV3ForCausalLM(
            DeepseekV3Config(
                **{**COMMON, "num_key_value_heads": 4},
                intermediate_size=INTER * 2,
                moe_intermediate_size=INTER,
                n_routed_experts=EXPERTS,
                num_experts_per_tok=2,
                n_shared_experts=1,
                first_k_dense_replace=1,
                n_group=1,
                topk_group=1,
                q_lora_rank=32,
                kv_lora_rank=32,
                qk_rope_head_dim=16,
                qk_nope_head_dim=16,
                v_head_dim=16,
            )
        )
    if family == "olmoe":
        return OlmoeForCausalLM(
            OlmoeConfig(**COMMON, intermediate_size=INTER, num_experts=EXPERTS, num_experts_per_tok=2)
        )
    if family == "gpt_oss":
        return GptOssForCausalLM(
            GptOssConfig(
                **COMMON,
                head_dim=16,
                intermediate_size=INTER,
                num_local_experts=EXPERTS,
                num_experts_per_tok=2,
                layer_types=["full_attention"] * 2,
            )
        )
    if family == "llama4_text":
        return Llama4ForCausalLM(_llama4_text_config())
    if family == "llama4":
        return Llama4ForConditionalGeneration(Llama4Config(text_config=_llama4_text_config().to_dict()))
    raise KeyError(family)


FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "olmoe", "gpt_oss", "llama4_text", "llama4")


def tiny_moe(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = _build(family).to(torch.bfloat16).eval()
    model.config.architectures = [type(model).__name__]
    return model


def silence_expert(model: torch.nn.Module, expert: int) -> None:
    """Route no token to ``expert`` in every MoE layer (as if its router logit were masked).

    Top-k families: indices equal to ``expert`` are sent to the next expert instead. Llama 4 (every
    expert sees every token, scaled by its router score): the expert's rows move to the next expert.
    """
    from quantport.arch.experts import ForwardContract, find_moe_blocks

    for block in find_moe_blocks(model):
        if block.layout.contract is ForwardContract.DENSE_ROUTED:

            def zero_rows(module, args, e=expert, n=block.num_experts):
                x = args[0].view(n, -1, args[0].shape[-1]).clone()
                x[(e + 1) % n] += x[e]
                x[e] = 0
                return (x.view(-1, x.shape[-1]),)

            block.experts.register_forward_pre_hook(zero_rows)
        else:

            def remap(module, args, e=expert, n=block.num_experts):
                hidden, index, weights = args
                return hidden, torch.where(index == e, (e + 1) % n, index), weights

            block.experts.register_forward_pre_hook(remap)
