"""The checker's view of a checkpoint's quantization config and model facts.

The config is parsed by the shared reader (:mod:`quantport.read.quant_config`, also used by
``quantport inspect`` and ``quantport.load``); the config rules judge whether its values are valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..read.quant_config import CTGroup, Dialect, QuantConfig, config_quant_block
from ..read.quant_config import parse_quant_config as parse_dialect_config
from .checkpoint import Checkpoint

__all__ = [
    "CTGroup",
    "Format",
    "ModelFacts",
    "QuantConfig",
    "config_quant_block",
    "model_facts",
    "parse_quant_config",
]


Format = Dialect
"""The checker's name for :class:`~quantport.read.quant_config.Dialect`."""


def parse_quant_config(ckpt: Checkpoint) -> QuantConfig:
    """The config an engine would use: config.json's block, else hf_quant_config.json."""
    return parse_dialect_config(ckpt.config, ckpt.hf_quant_config)


@dataclass(frozen=True)
class ModelFacts:
    """What config.json says about the model itself."""

    model_type: str = ""
    text_model_type: str = ""
    architectures: tuple[str, ...] = ()
    num_experts: int | None = None
    hidden_size: int | None = None


_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def model_facts(config: dict[str, Any] | None) -> ModelFacts:
    """Model type, architecture, expert count and hidden size (text config first for VLMs)."""
    if not config:
        return ModelFacts()
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    experts = None
    for holder in (text, config):
        for key in _EXPERT_COUNT_KEYS:
            if type(holder.get(key)) is int and holder[key] > 0:
                experts = holder[key]
                break
        if experts is not None:
            break
    hidden = text.get("hidden_size", config.get("hidden_size"))
    archs = config.get("architectures") if isinstance(config.get("architectures"), list) else ()
    return ModelFacts(
        model_type=str(config.get("model_type") or ""),
        text_model_type=str(text.get("model_type") or config.get("model_type") or ""),
        architectures=tuple(a for a in archs if isinstance(a, str)),
        num_experts=experts,
        hidden_size=hidden if isinstance(hidden, int) else None,
    )
