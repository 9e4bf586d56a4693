"""The whole-model path: after each rank calibrated its share, make every rank hold the statistics of all of it.

What calibration leaves on a model, and how it is combined over ranks:

============================================  ==========================  =====
statistic                                     where                       op
============================================  ==========================  =====
input amax of a quantized Linear (0-d)        ``QuantLinear.input_amax``  MAX
KV-cache key and value amax (0-d)             ``KVCacheQuantizer``        MAX
expert input amax per projection (``[E]``)    ``ExpertsCalibrator``       MAX
tokens routed to each expert (int64 ``[E]``)  ``ExpertsCalibrator``       SUM
GPTQ ``X^T X`` sum (fp32) and its token count ``HessianAccumulator``      SUM
calibration tokens                            ``QuantizationState``       SUM
============================================  ==========================  =====

Everything else on the model (weight amax, shared-input groups, coverage, the algorithms' results) is
computed after this step from these statistics and the weights, which every rank holds identically, so every
rank computes it identically. Only the Hessian sums are not bit-equal to one process (see :mod:`.statistics`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..input_checks import check_finite_statistics
from ..modules.kv_cache import kv_quantizer_of
from ..modules.quant_experts import experts_quantizer_of
from ..modules.quant_linear import QuantLinear
from .session import current_session
from .statistics import Statistics, reduce_statistics

__all__ = ["agree_on_statistics", "collect_statistics", "hessian_accumulators", "store_statistics"]

logger = logging.getLogger(__name__)

CALIBRATION_TOKENS = "calibration_tokens"


def hessian_accumulators(step: Any) -> dict[str, Any]:
    """The algorithm step's Hessian accumulators by name, each once (fused siblings share one)."""
    observer = getattr(step, "observer", None)
    accumulators = getattr(observer, "accumulators", None) or {}
    unique: dict[str, Any] = {}
    seen: set[int] = set()
    for name in sorted(accumulators):
        if id(accumulators[name]) not in seen:
            seen.add(id(accumulators[name]))
            unique[name] = accumulators[name]
    return unique


def collect_statistics(model: nn.Module, step: Any, calibration_tokens: int) -> Statistics:
    """This rank's statistics of ``model`` (and of the algorithm ``step``), named by module."""
    stats = Statistics()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            stats.maximum[f"{name}#input"] = module.input_amax
        kv = kv_quantizer_of(module)
        if kv is not None:
            stats.maximum[f"{name}#k"] = kv.k_amax
            stats.maximum[f"{name}#v"] = kv.v_amax
        experts = experts_quantizer_of(module)
        if experts is not None:
            for projection, amax in experts.input_amax.items():
                stats.maximum[f"{name}#experts.{projection}"] = amax
            stats.sums[f"{name}#experts.tokens"] = experts.tokens
    for name, accumulator in hessian_accumulators(step).items():
        total = accumulator.sum
        if total is None:  # no token reached it on this rank
            total = torch.zeros(accumulator.in_features, accumulator.in_features, device=accumulator.device)
        stats.sums[f"{name}#hessian"] = total
        stats.sums[f"{name}#hessian.tokens"] = torch.tensor(accumulator.tokens, dtype=torch.int64)
    stats.sums[CALIBRATION_TOKENS] = torch.tensor(calibration_tokens, dtype=torch.int64)
    return stats


def _on(value: torch.Tensor | None, like: nn.Module) -> torch.Tensor | None:
    parameter = next(like.parameters(), None)
    if value is None or parameter is None:
        return value
    return value.to(parameter.device)


def store_statistics(model: nn.Module, step: Any, stats: Statistics) -> int:
    """Write reduced ``stats`` back where :func:`collect_statistics` read them; returns the calibration tokens."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            module.input_amax = _on(stats.maximum[f"{name}#input"], module)
        kv = kv_quantizer_of(module)
        if kv is not None:
            kv.k_amax = _on(stats.maximum[f"{name}#k"], module)
            kv.v_amax = _on(stats.maximum[f"{name}#v"], module)
        experts = experts_quantizer_of(module)
        if experts is not None:
            calibrator = experts.calibrator
            for projection in list(calibrator.input_amax):
                calibrator.input_amax[projection] = stats.maximum[f"{name}#experts.{projection}"].to(
                    calibrator.tokens.device
                )
            calibrator.tokens = stats.sums[f"{name}#experts.tokens"].to(calibrator.tokens.device)
    for name, accumulator in hessian_accumulators(step).items():
        accumulator.tokens = int(stats.sums[f"{name}#hessian.tokens"])
        accumulator.sum = stats.sums[f"{name}#hessian"].to(accumulator.device) if accumulator.tokens else None
    return int(stats.sums[CALIBRATION_TOKENS])


def agree_on_statistics(model: nn.Module, step: Any, calibration_tokens: int) -> int:
    """In a distributed run: check this rank's statistics, vote, reduce them over every rank and store them
    (every rank then holds the same); returns the calibration tokens of all ranks. Outside one: returns
    ``calibration_tokens``."""
    session = current_session()
    if session is None:
        return calibration_tokens
    check_finite_statistics(model)  # a rank whose own statistics are not finite fails with that message
    session.agree("calibration")
    reduced = reduce_statistics(collect_statistics(model, step, calibration_tokens), session)
    tokens = store_statistics(model, step, reduced)
    logger.info("statistics of %d ranks reduced: %d calibration tokens in all", session.world_size, tokens)
    return tokens
