"""What input scale an expert gets, applied in one place for every MoE family.

Policies (``MoEInputScales``):

* ``shared`` (default): one input scale per projection per layer, the max over the layer's experts.
  This is what vLLM's FP8 MoE and FlashInfer's NVFP4 MoE compute anyway (they reduce per-expert
  scales to the max), so the simulation matches the engine and an expert with no calibration tokens
  gets a real, calibrated value.
* ``per-expert``: each expert keeps its own input scale; an expert that saw no tokens takes the max
  over its calibrated siblings. For engines that use per-expert scales.

Layouts exported with ModelOpt's fused names (Llama 4 multimodal, GPT-OSS) have one input scale per
projection on disk, so they always use ``shared``.

How statistics are gathered (``MoECalibration``): ``routed`` (default) records what the router
sends to each expert; ``all-experts`` records every token through every expert while the model's
output keeps the real routing (one extra dense pass over all experts per MoE layer and batch).
"""

from __future__ import annotations

import logging

import torch

from ..arch.experts import ExpertNaming
from ..errors import CalibrationDataError
from ..modules.quant_experts import PROJECTIONS, ExpertsQuantizer
from ..moe_options import MoECalibration, MoEInputScales

__all__ = ["MoECalibration", "MoEInputScales", "apply_input_policy"]

logger = logging.getLogger(__name__)


def apply_input_policy(quantizer: ExpertsQuantizer, policy: MoEInputScales) -> MoEInputScales:
    """Set ``quantizer.export_input_amax`` from its statistics; returns the policy actually used."""
    if quantizer.layout.naming is ExpertNaming.FUSED and policy is MoEInputScales.PER_EXPERT:
        logger.warning(
            "%s: %s experts are exported with one input scale per projection; using the shared policy",
            quantizer.block.experts_name,
            quantizer.layout.family,
        )
        policy = MoEInputScales.SHARED
    result: dict[str, torch.Tensor] = {}
    for projection in PROJECTIONS:
        amax = quantizer.input_amax[projection]
        observed = amax > 0
        if not bool(observed.any()):
            raise CalibrationDataError(
                f"no calibration token reached {quantizer.block.experts_name} ({projection}); give more "
                "calibration data (--calib-samples) or use --moe-calib all-experts"
            )
        layer_max = amax[observed].max()
        if policy is MoEInputScales.SHARED:
            result[projection] = layer_max.expand_as(amax).clone()
        else:
            result[projection] = torch.where(observed, amax, layer_max)
    quantizer.export_input_amax = result
    return policy
