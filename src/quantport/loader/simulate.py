"""Activation simulation for a loaded checkpoint: what the engine does to activations.

Dense Linear layers get a forward pre-hook that passes their input through the scheme codec's
``fake_quantize_input`` with the stored ``input_scale``: the same function the quantized model's
simulation calls, so a checkpoint quantport wrote computes the same logits when loaded. The FP8 KV
cache reuses quantport's KV-cache quantizer with the stored ``k_scale`` / ``v_scale``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modules.kv_cache import KVCacheQuantizer, install_kv_quantizer
from ..modules.quant_linear import QuantMode
from ..schemes import SchemeCodec

__all__ = ["InputFakeQuant", "StoredKVScales", "install_input_fake_quant", "install_kv_scales"]


class InputFakeQuant:
    """Forward pre-hook: ``x -> codec.fake_quantize_input(x, input_scale)``.

    Attributes:
        codec: the layer's scheme codec.
        input_scale: fp32 0-d stored ``input_scale`` (None for dynamic activations).
    """

    def __init__(self, codec: SchemeCodec, input_scale: torch.Tensor | None) -> None:
        self.codec = codec
        self.input_scale = input_scale

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x, *rest = args
        return (self.codec.fake_quantize_input(x, self.input_scale), *rest)


def install_input_fake_quant(linear: nn.Module, codec: SchemeCodec, input_scale: torch.Tensor | None) -> None:
    """Make ``linear`` see its input as the engine quantizes it."""
    if not isinstance(linear, nn.Linear):
        raise NotImplementedError(
            f"activation simulation is implemented for nn.Linear layers, not {type(linear).__name__}; "
            "load with simulate_activations=False"
        )
    if codec.static_input_scale and input_scale is None:
        raise ValueError(f"a {codec.scheme.value} layer needs its stored input_scale to simulate activations")
    linear.register_forward_pre_hook(InputFakeQuant(codec, input_scale))


class StoredKVScales(KVCacheQuantizer):
    """A KV-cache quantizer whose FP8 scales are read from a checkpoint instead of calibrated."""

    k_scale: torch.Tensor
    v_scale: torch.Tensor

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_scale, self.v_scale


def install_kv_scales(attention: nn.Module, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """Fake-quantize ``attention``'s keys and values to FP8 with the stored scales."""
    quantizer = install_kv_quantizer(attention)
    quantizer.__class__ = StoredKVScales
    quantizer.k_scale = k_scale.float().reshape(())  # type: ignore[attr-defined]
    quantizer.v_scale = v_scale.float().reshape(())  # type: ignore[attr-defined]
    quantizer.mode = QuantMode.SIMULATE
