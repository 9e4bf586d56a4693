"""No tensors the engines do not load (engine-contract.md §2 "AWQ pre_quant_scale", §8.10).

Calibration state (``_amax``, ``*_quantizer.*``) and AWQ ``pre_quant_scale`` have no parameter in
vLLM's ModelOpt methods, and ModelOpt's export drops ``weight_shape``; the loader fails on them
("no module or parameter named ...") or, worse, skips them silently.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..findings import Finding, Rule
from ..qconfig import Format
from ..structure import Context

__all__ = ["check"]

AMAX = Rule(
    "stray.amax",
    "a calibration amax tensor was exported",
    "drop *_amax tensors; export scales (amax / 448 ...) instead",
)
QUANTIZER = Rule(
    "stray.quantizer-state",
    "quantizer state was exported",
    "drop *_quantizer.* tensors; they are calibration state, not checkpoint tensors",
)
PRE_QUANT = Rule(
    "stray.pre-quant-scale",
    "an AWQ pre_quant_scale is stored",
    "fold pre_quant_scale into the previous layer (norm or linear) before export",
)
WEIGHT_SHAPE = Rule(
    "stray.weight-shape",
    "a weight_shape tensor is stored in a ModelOpt checkpoint",
    "drop weight_shape (it belongs to compressed-tensors pack-quantized only)",
)


def check(ctx: Context) -> Iterator[Finding]:
    modelopt = ctx.qcfg.format is Format.MODELOPT
    for info in ctx.sorted_tensors:
        name = info.name
        param = name.rpartition(".")[2]
        if param.endswith("_amax") or param == "amax":
            yield AMAX.finding(name, f"{name} is calibration state")
        elif "_quantizer" in name or param.endswith("_bias_value"):
            yield QUANTIZER.finding(name, f"{name} is quantizer state")
        elif param == "pre_quant_scale":
            yield PRE_QUANT.finding(name, f"{name}: the engine has no pre_quant_scale parameter")
        elif modelopt and param == "weight_shape":
            yield WEIGHT_SHAPE.finding(name, f"{name} is not part of the ModelOpt format")
