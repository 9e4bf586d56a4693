"""Tiny random dense models built from configs, and fixed calibration batches (no downloads)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM


def _tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kwargs = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    config.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def _tiny_qwen3(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    kwargs = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    config = Qwen3Config(**kwargs)
    config.architectures = ["Qwen3ForCausalLM"]
    return Qwen3ForCausalLM(config).to(torch.bfloat16).eval()


TINY_MODELS: dict[str, Callable[..., torch.nn.Module]] = {"llama": _tiny_llama, "qwen3": _tiny_qwen3}


def make_calibration_batches(vocab_size: int = 512, n: int = 3, batch: int = 2, seq: int = 32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab_size, (batch, seq), generator=generator) for _ in range(n)]
