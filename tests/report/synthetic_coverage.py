"""Synthetic expert coverage shaped like a real router's: skewed token counts, a few starved experts."""

from __future__ import annotations

import numpy as np

from quantport.report.coverage import ExpertCoverage, LayerCoverage


def synthetic_coverage(
    experts: int, layers: int, dead_per_layer: float = 0.6, seed: int = 0, with_amax: bool = True
) -> ExpertCoverage:
    """``layers`` MoE layers of ``experts`` experts; about ``dead_per_layer`` experts per layer get 0 tokens.

    Token counts are log-normal around 4096 / experts * 8 (a top-8 router over 4096 tokens), so the
    busiest expert sees tens of times what the quietest live one sees, as trained routers do.
    """
    rng = np.random.default_rng(seed)
    coverage = ExpertCoverage("shared", "routed")
    mean = 4096 * 8 / experts
    for index in range(layers):
        tokens = np.maximum(1, rng.lognormal(np.log(mean), 1.0, experts)).astype(int)
        tokens[rng.random(experts) < dead_per_layer / experts] = 0
        amax = {}
        if with_amax:
            base = 2.0 + index / layers * 6
            for projection, skew in (("gate_up", 0.2), ("down", 0.8)):
                values = base * rng.lognormal(0.0, skew, experts)
                amax[projection] = tuple(float(v) if t else 0.0 for v, t in zip(values, tokens, strict=True))
        coverage.layers.append(LayerCoverage(f"model.layers.{index}.mlp", tuple(int(t) for t in tokens), amax))
    return coverage
