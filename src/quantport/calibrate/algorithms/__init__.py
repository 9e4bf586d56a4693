"""Calibration algorithms: how the quantized layers' weights and scales are decided.

One module per :class:`~quantport.algorithm_options.Algorithm` (``max.py``, ``mse.py``, ``gptq.py``, and
``smoothing.py`` for ``awq`` / ``smoothquant``), each registering a step class in :data:`.registry.ALGORITHMS`;
:func:`start_algorithm` is what :func:`quantport.quantize` calls. Options are the typed dataclasses of
:mod:`quantport.algorithm_options`. AWQ and SmoothQuant fold their scales before quantization
(:func:`.smoothing.smooth_model`), so they reach MoE experts too; ``gptq`` covers MoE experts
(:mod:`.gptq_experts`); with ``mse`` experts keep round-to-nearest, and the state names them.
"""

from __future__ import annotations

import logging

from torch import nn

from ...algorithm_options import Algorithm, AlgorithmOptions, algorithm_name
from ...arch.fused_groups import find_shared_input_groups
from ...modules.quant_experts import experts_quantizer_of
from ...modules.quant_linear import QuantLinear
from ...schemes import SchemeCodec
from ...state import QuantizationState
from . import gptq, max, mse, smoothing  # noqa: F401,A004  (registration)
from .registry import ALGORITHMS, AlgorithmContext, AlgorithmStep

__all__ = ["ALGORITHMS", "AlgorithmContext", "AlgorithmStep", "experts_note", "finish_algorithm", "start_algorithm"]

logger = logging.getLogger(__name__)


def start_algorithm(
    model: nn.Module, codec: SchemeCodec, options: AlgorithmOptions, folded: object = None
) -> AlgorithmStep:
    """The step of ``options.algorithm`` over ``model``'s quantized Linear layers (hooks installed if it observes);
    ``folded`` is what :func:`.smoothing.smooth_model` folded before (AWQ, SmoothQuant)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    groups = []
    for group in find_shared_input_groups(model):
        members = tuple(m for m in group.members if m in layers)
        if len(members) > 1:
            groups.append(members)
    experts = [q for q in map(experts_quantizer_of, model.modules()) if q is not None]
    return ALGORITHMS[options.algorithm](AlgorithmContext(options, codec, layers, groups, experts, smoothing=folded))


def experts_note(options: AlgorithmOptions) -> str | None:
    """Why quantized MoE experts keep round-to-nearest under ``options`` (None for ``max``)."""
    weight_search = getattr(options, "then", None) or options
    if weight_search.algorithm in (Algorithm.MAX, Algorithm.AWQ, Algorithm.SMOOTHQUANT):
        return None  # max: nothing to do; awq / smoothquant: the folded scales reach the experts
    if weight_search.algorithm is Algorithm.GPTQ:
        return None if weight_search.experts else "round-to-nearest: gptq without experts (--gptq-no-experts)"
    return f"round-to-nearest: {weight_search.algorithm.value} is not implemented for MoE experts yet"


def finish_algorithm(step: AlgorithmStep, state: QuantizationState) -> None:
    """Apply ``step`` once the statistics are final and record in ``state`` what it left at round-to-nearest."""
    step.apply()
    options = step.context.options
    state.algorithm = algorithm_name(options)
    if step.context.smoothing is not None:
        state.smoothing = step.context.smoothing.summary()
    state.left_at_rtn = dict(step.context.left_at_rtn)
    state.algorithm_notes = dict(step.context.notes)
    note = experts_note(options)
    if note is not None:
        for name in state.experts:
            state.left_at_rtn[name] = note
        if state.experts:
            logger.warning("%d MoE experts module(s) keep %s", len(state.experts), note)
