"""KV-cache quantization: observe (and fake-quantize) keys and values as they enter attention.

transformers 5 attention modules compute q/k/v, apply RoPE, update the cache and then call the
function registered under ``config._attn_implementation``. quantport registers one more attention
function per original implementation, ``quantport_kv_<original>`` (e.g. ``quantport_kv_sdpa``): it
hands keys and values (after RoPE, before the GQA repeat) to the module's :class:`KVCacheQuantizer`,
then calls the model's original attention function. The original implementation is part of the
name the config holds, so nothing about a model is kept outside it, and no model code is patched.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import InvalidArgumentError
from ..formats import fp8
from .observe import update_amax
from .quant_linear import QuantMode

__all__ = ["ATTENTION_KEY", "KVCacheQuantizer", "install_kv_quantizer", "kv_quantizer_of", "original_implementation"]

ATTENTION_KEY = "quantport_kv"
"""Prefix of the attention implementations quantport registers (``quantport_kv_<original>``)."""
_ATTR = "_quantport_kv"


class KVCacheQuantizer:
    """Per-attention-module FP8 KV-cache statistics (amax of keys and values) and simulation."""

    def __init__(self, delegate: Callable[..., Any]) -> None:
        self.delegate = delegate
        self.k_amax: torch.Tensor | None = None
        self.v_amax: torch.Tensor | None = None
        self.mode = QuantMode.OFF

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 0-d ``k_scale`` and ``v_scale`` (amax / 448)."""
        if self.k_amax is None or self.v_amax is None:
            raise RuntimeError("KV cache was not calibrated: no keys/values reached attention")
        return fp8.fp8_scale_from_amax(self.k_amax), fp8.fp8_scale_from_amax(self.v_amax)

    def process(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode is QuantMode.CALIBRATE:
            self.k_amax = update_amax(self.k_amax, key)
            self.v_amax = update_amax(self.v_amax, value)
        elif self.mode is QuantMode.SIMULATE:
            k_scale, v_scale = self.scales()
            key, value = fp8.fake_quantize_fp8(key, k_scale), fp8.fake_quantize_fp8(value, v_scale)
        return key, value


def _quantport_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    quantizer: KVCacheQuantizer = getattr(module, _ATTR)
    key, value = quantizer.process(key, value)
    return quantizer.delegate(module, query, key, value, attention_mask, **kwargs)


def original_implementation(implementation: str) -> str:
    """The model's own attention implementation behind a (possibly quantport) ``_attn_implementation``."""
    prefix = f"{ATTENTION_KEY}_"
    return implementation[len(prefix) :] if implementation.startswith(prefix) else implementation


def _original_attention(module: nn.Module, implementation: str) -> Callable[..., Any]:
    if implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise InvalidArgumentError(
            f"attention implementation {implementation!r} of {type(module).__name__} cannot be wrapped for "
            "KV-cache quantization; load the model with attn_implementation='sdpa' or 'eager'"
        )
    return eager


def install_kv_quantizer(module: nn.Module) -> KVCacheQuantizer:
    """Attach a :class:`KVCacheQuantizer` to an attention module and route its attention through it."""
    config = getattr(module, "config", None)
    if config is None:
        raise InvalidArgumentError(
            f"attention module {type(module).__name__} has no `config`; KV-cache quantization needs a "
            "transformers-5 attention module"
        )
    existing = getattr(module, _ATTR, None)
    if existing is not None:
        return existing
    implementation = original_implementation(config._attn_implementation or "eager")
    quantizer = KVCacheQuantizer(_original_attention(module, implementation))
    setattr(module, _ATTR, quantizer)
    key = f"{ATTENTION_KEY}_{implementation}"
    AttentionInterface.register(key, _quantport_attention)  # idempotent: the same function for every model
    config._attn_implementation = key
    return quantizer


def kv_quantizer_of(module: nn.Module) -> KVCacheQuantizer | None:
    """The module's KV-cache quantizer, if one is installed."""
    return getattr(module, _ATTR, None)
