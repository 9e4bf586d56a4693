"""Which experts a MoE block's router sends sampled tokens to, and with what weight (AWQ's expert scores).

The router module itself is called on the sampled block inputs, so the family's own rule (softmax then
top-k, renormalised or not; sigmoid of the top logits) decides. Two output forms are read:

* ``TOP_K`` experts (transformers-5 ``@use_experts_implementation`` blocks): the router returns
  ``(logits, weights [n, k], indices [n, k])``; each expert's output is multiplied by its weight.
* ``DENSE_ROUTED`` experts (Llama 4): the router returns ``(scores [n, E], logits)``, dense scores that
  are zero outside the top-k; each expert's *input* is multiplied by its score.

A router whose output is neither falls back to the top-k of its logits with weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...arch.experts import ForwardContract

__all__ = ["Routing", "route"]


@dataclass(frozen=True, slots=True)
class Routing:
    """Routing decisions of ``n`` sampled tokens.

    Attributes:
        indices: ``[n, k]`` experts of each token.
        weights: fp32 ``[n, k]`` the weight of each (token, expert).
        weighs_input: the weight multiplies the expert's input (else its output).
    """

    indices: Tensor
    weights: Tensor
    weighs_input: bool = False

    def tokens(self, expert: int) -> tuple[Tensor, Tensor]:
        """The sampled rows routed to ``expert`` ``[m]`` and their weights (fp32 ``[m]``)."""
        hit = self.indices == expert
        rows = hit.any(dim=-1).nonzero().squeeze(-1)
        weights = (self.weights * hit).sum(dim=-1)[rows]
        return rows, weights.float()


def _top_k_from_logits(logits: Tensor, top_k: int) -> Routing:
    indices = logits.float().topk(min(top_k, logits.shape[-1]), dim=-1).indices
    return Routing(indices, torch.ones(indices.shape, device=indices.device))


def route(router: nn.Module, contract: ForwardContract, sample: Tensor, top_k: int) -> Routing:
    """Routing of ``sample`` ``[n, hidden]`` by ``router`` (called in its weight's dtype)."""
    weight = router.weight.detach()
    x = sample.to(weight.dtype)
    with torch.no_grad():
        out = router(x)
    parts = out if isinstance(out, tuple) else (out,)
    n = sample.shape[0]
    if contract is ForwardContract.DENSE_ROUTED:
        scores = parts[0].float()
        if scores.shape == (n, weight.shape[0]):
            top = scores.topk(min(top_k, scores.shape[-1]), dim=-1)
            return Routing(top.indices, top.values, weighs_input=True)
    else:
        indices = next((p for p in parts if not p.is_floating_point()), None)
        if indices is not None and indices.shape[0] == n:
            weights = next((p for p in parts if p.is_floating_point() and p.shape == indices.shape), None)
            if weights is not None:
                return Routing(indices, weights.float())
    return _top_k_from_logits(x @ weight.T, top_k)
