"""Quantized views of model modules: QuantLinear and the KV-cache observer."""

from .kv_cache import KVCacheQuantizer
from .quant_linear import QuantLinear, QuantMode

__all__ = ["KVCacheQuantizer", "QuantLinear", "QuantMode"]
