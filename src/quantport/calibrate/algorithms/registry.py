"""The algorithm registry: one step class per :class:`~quantport.algorithm_options.Algorithm`.

A step is made before the calibration forward (it may hook the quantized Linears to observe their
inputs), told when the forward is over, and applied once the pipeline's statistics are final (after
fused groups share their weight amax). Applying may replace a quantized Linear's weight with one the
codec quantizes to the algorithm's codes and scales (see :mod:`.units`); export, simulation and
``quantport.load`` then read that weight like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ...algorithm_options import Algorithm, AlgorithmOptions
from ...modules.quant_experts import ExpertsQuantizer
from ...modules.quant_linear import QuantLinear
from ...schemes import SchemeCodec

__all__ = ["ALGORITHMS", "AlgorithmContext", "AlgorithmStep", "register", "replace_weight"]


@dataclass
class AlgorithmContext:
    """What an algorithm step works on.

    Attributes:
        options: the algorithm's typed options.
        codec: the recipe's codec.
        layers: quantized Linear layers by name.
        groups: fused groups (names of members that share one input), each with two members or more.
        experts: the quantized MoE experts modules' quantizers.
        rerun_forward: runs the calibration forward again (the model in full precision, no statistics
            recorded), for a step that observes in several passes; set by the pipeline when it runs one.
        left_at_rtn: filled by the step: modules left at round-to-nearest -> why.
        notes: filled by the step: modules it treated otherwise than asked -> how (e.g. more dampening).
        smoothing: what AWQ / SmoothQuant folded before quantization (a ``SmoothingReport``), if they ran.
    """

    options: AlgorithmOptions
    codec: SchemeCodec
    layers: dict[str, QuantLinear]
    groups: list[tuple[str, ...]]
    experts: list[ExpertsQuantizer] = field(default_factory=list)
    rerun_forward: Callable[[], None] | None = None
    left_at_rtn: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    smoothing: Any = None

    def quantized_layers(self) -> dict[str, QuantLinear]:
        """The layers still quantized (the pipeline reverts those that never ran in a static-scale recipe)."""
        return {n: m for n, m in self.layers.items() if isinstance(m, QuantLinear)}


class AlgorithmStep(Protocol):
    """One algorithm's work in one :func:`quantport.quantize` call."""

    needs_forward: bool
    """Whether the step needs the calibration forward (to observe inputs)."""
    context: AlgorithmContext

    def stop_observing(self) -> None:
        """The calibration forward is over (or failed): remove any hooks."""
        ...

    def apply(self) -> None:
        """Decide the layers' weights and scales (replacing weights where the algorithm changes them)."""
        ...


ALGORITHMS: dict[Algorithm, Callable[[AlgorithmContext], AlgorithmStep]] = {}


def register(algorithm: Algorithm) -> Callable[[type], type]:
    """Class decorator: the step class of ``algorithm``."""

    def decorate(cls: type) -> type:
        ALGORITHMS[algorithm] = cls
        return cls

    return decorate


def replace_weight(module: QuantLinear, weight: torch.Tensor) -> None:
    """Give ``module`` the weight an algorithm chose (same shape and dtype); its cached simulation is dropped."""
    if weight.shape != module.weight.shape or weight.dtype != module.weight.dtype:
        raise ValueError(f"replacement weight {tuple(weight.shape)} {weight.dtype} does not match the layer's")
    module.weight = nn.Parameter(weight.to(module.weight.device), requires_grad=module.weight.requires_grad)
    module.cache_simulated_weight(False)
