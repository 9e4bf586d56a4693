"""The MoE rules (ids, summaries, fixes), shared by the per-expert checks (:mod:`.moe`) and the fused
3-D expert checks (:mod:`.fused_experts`) without either importing the other."""

from __future__ import annotations

from ..findings import Rule, Severity

__all__ = [
    "COUNT_UNKNOWN",
    "EXPERT_INCOMPLETE",
    "EXPERT_MISSING",
    "EXPERT_UNEXPECTED",
    "FUSED_NAMING",
    "FUSED_SHAPE",
    "OUTLIER",
    "SCHEME",
]

EXPERT_MISSING = Rule(
    "moe.expert-missing",
    "an expert (or a projection of it) of a MoE layer is not stored",
    "export every expert, calibrated or not (an uncalibrated expert needs fallback scales)",
)
EXPERT_INCOMPLETE = Rule(
    "moe.expert-incomplete",
    "an expert lacks a tensor that its siblings or its format have",
    "export the tensor for every expert; vLLM silently keeps 1.0 or uninitialised memory",
)
EXPERT_UNEXPECTED = Rule(
    "moe.expert-unexpected",
    "an expert index is not below the configured expert count",
    "drop the extra experts or fix num_experts in config.json",
)
COUNT_UNKNOWN = Rule(
    "moe.expert-count-unknown",
    "config.json gives no expert count",
    "set num_experts / num_local_experts / n_routed_experts in config.json",
    Severity.WARNING,
)
OUTLIER = Rule(
    "moe.input-scale-outlier",
    "an expert's input scale is over 10x the layer median",
    "check that expert's calibration; engines take the max over experts, so it sets the scale of the whole layer",
    Severity.WARNING,
)
SCHEME = Rule(
    "moe.scheme-unsupported",
    "the engine has no MoE kernel for this expert scheme",
    "use per-tensor FP8 or NVFP4 for experts (or MIXED_PRECISION / compressed-tensors for block FP8)",
)
FUSED_NAMING = Rule(
    "moe.fused-naming",
    "fused 3-D expert names for a family the engines load per expert",
    "write experts as experts.{e}.<gate|up|down leaf>.* 2-D tensors",
)
FUSED_SHAPE = Rule(
    "moe.fused-shape",
    "a fused expert tensor has the wrong dtype or shape",
    "write fused experts in the model's layout ([E, H, 2I] / [E, I, H], NVFP4 packed along H)",
)
