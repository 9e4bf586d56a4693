"""What input scale an expert gets, applied in one place for every MoE family.

Policies (``MoEInputScales``):

* ``shared`` (default): one input scale per projection per layer, the max over the layer's experts.
  This is what vLLM's FP8 MoE and FlashInfer's NVFP4 MoE compute anyway (they reduce per-expert
  scales to the max), so the simulation matches the engine and an expert with no calibration tokens
  gets a real, calibrated value.
* ``per-expert``: each expert keeps its own input scale; an expert that saw no tokens takes the max
  over its calibrated siblings. For engines that use per-expert scales.

Families whose engine reads one input scale per projection for all experts
(:attr:`~quantport.arch.experts.ExpertScales.ONE_PER_PROJECTION`: Llama 4 multimodal, GPT-OSS) can
only use ``shared``; asking for ``per-expert`` there is an error, never silently replaced.

How statistics are gathered (``MoECalibration``): ``routed`` (default) records what the router
sends to each expert; ``all-experts`` records every token through every expert while the model's
output keeps the real routing (one extra dense pass over all experts per MoE layer and batch).
"""

from __future__ import annotations

import torch

from ..arch.experts import ExpertLayout, ExpertScales
from ..errors import CalibrationDataError, InvalidArgumentError
from ..modules.quant_experts import PROJECTIONS, ExpertsQuantizer
from ..moe_options import MoECalibration, MoEInputScales

__all__ = ["MoECalibration", "MoEInputScales", "apply_input_policy", "check_input_policy"]


def check_input_policy(layout: ExpertLayout, policy: MoEInputScales) -> None:
    """Refuse a policy the family's engine cannot represent (before any calibration work)."""
    if layout.scales is ExpertScales.ONE_PER_PROJECTION and policy is MoEInputScales.PER_EXPERT:
        raise InvalidArgumentError(
            f"--moe-input-scales per-expert is not possible for {layout.family} experts: their engine reads one "
            "input scale per projection for all experts; use --moe-input-scales shared (the default)"
        )


def apply_input_policy(quantizer: ExpertsQuantizer, policy: MoEInputScales) -> MoEInputScales:
    """Set ``quantizer.export_input_amax`` from its statistics with ``policy``; returns it."""
    check_input_policy(quantizer.layout, policy)
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
