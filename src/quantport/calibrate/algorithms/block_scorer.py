"""AWQ's score of a MoE block's input scale: the error of the block's output, not of each Linear's.

For the scale ``s`` of the MLP norm's output, the readers are gated MLPs (every expert, the shared
experts): ``y = down(act(x gate^T) * (x up^T))``. A candidate is scored by

    sum_tokens || sum_r w_r (y_r(x) - y_r'(x)) ||^2

where ``y_r'`` reads ``fq(x / s)`` through ``Q(gate * s)`` and ``Q(up * s)`` (the recipe's codec; ``down``
is left exact: its own scale is chosen next), ``w_r`` is the router's weight of the token for reader ``r``
(1 for a shared expert) and the sum over readers is taken per token before squaring, as the block adds
its experts' outputs. So the score sees what the proxy ``sum ||X W^T - X' Q(W')^T||^2`` does not: the
activation function, down_proj's mixing of the intermediate channels and the routing weights. Where the
family weighs the expert's input instead of its output (Llama 4), ``w_r`` multiplies the input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...arch.experts import MoEBlock
from ...arch.smoothing_names import SMOOTHING_NAMES, SmoothingNames
from ...schemes import SchemeCodec
from .awq import fake_quantized_input, fake_quantized_weight
from .routing import Routing

__all__ = ["GatedMlpScorer", "GatedReader", "gated_readers"]


@dataclass(frozen=True, slots=True)
class GatedReader:
    """One gated MLP reading the shared input.

    Attributes:
        gate, up: ``[I, H]`` in the model dtype. down: ``[H, I]``.
        act: the MLP's activation function.
        rows: indices of the sampled tokens that reach it (None: all).
        weights: fp32 ``[len(rows)]`` routing weight of those tokens (None: 1).
        weighs_input: the weight multiplies the MLP's input (else its output).
    """

    gate: Tensor
    up: Tensor
    down: Tensor
    act: Callable[[Tensor], Tensor]
    rows: Tensor | None = None
    weights: Tensor | None = None
    weighs_input: bool = False

    def output(self, x: Tensor, gate: Tensor, up: Tensor) -> Tensor:
        """fp32 weighted output of the MLP on all sampled rows ``x`` (only its own rows are read)."""
        if self.rows is not None:
            x = x[self.rows]
        weight = None if self.weights is None else self.weights.to(x.device)[:, None]
        if weight is not None and self.weighs_input:
            x = x * weight
        out = (self.act(x @ gate.T) * (x @ up.T)) @ self.down.float().T
        return out * weight if weight is not None and not self.weighs_input else out


class GatedMlpScorer:
    """Block output error of a candidate column scale: one codec call on all gate and up weights stacked
    (they share one per-tensor amax: NVFP4's global scale is approximated by the largest)."""

    def __init__(self, codec: SchemeCodec, sample: Tensor, readers: list[GatedReader]) -> None:
        self.codec, self.readers = codec, readers
        self.sample = sample.float()
        self.dtype = readers[0].gate.dtype
        self.weight = torch.cat([w.float() for r in readers for w in (r.gate, r.up)])
        self.reference = self._block(self.sample, [(r.gate.float(), r.up.float()) for r in readers])

    def _block(self, x: Tensor, weights: list[tuple[Tensor, Tensor]]) -> Tensor:
        out = torch.zeros(x.shape[0], self.readers[0].down.shape[0], device=x.device)
        for reader, (gate, up) in zip(self.readers, weights, strict=True):
            y = reader.output(x, gate, up)
            if reader.rows is None:
                out += y
            else:
                out.index_add_(0, reader.rows.to(x.device), y)
        return out

    def error(self, column: Tensor) -> float:
        quantized = fake_quantized_weight(self.codec, (self.weight * column).to(self.dtype))
        x = fake_quantized_input(self.codec, self.sample / column, self.dtype)
        pairs, start = [], 0
        for reader in self.readers:
            rows = reader.gate.shape[0]
            pairs.append((quantized[start : start + rows], quantized[start + rows : start + 2 * rows]))
            start += 2 * rows
        return float((self.reference - self._block(x, pairs)).square().sum())


def _gated_mlp(modules: dict[str, nn.Module], gate: str, up: str, names: SmoothingNames) -> GatedReader | None:
    """The dense gated MLP whose gate and up Linears are ``gate`` and ``up`` (None: they are not one)."""
    parent_name, _, gate_leaf = gate.rpartition(".")
    if up.rpartition(".")[0] != parent_name or parent_name not in modules:
        return None
    parent = modules[parent_name]
    act = getattr(parent, "act_fn", None) or getattr(parent, "activation_fn", None)  # Llama 4: activation_fn
    triple = next(
        (t for t in names.gated_mlp if t[:2] == (gate_leaf, up.rpartition(".")[2]) and hasattr(parent, t[2])), None
    )
    if triple is None or not callable(act) or not isinstance(getattr(parent, triple[2]), nn.Linear):
        return None
    if any(getattr(modules[n], "bias", None) is not None for n in (gate, up)):
        return None
    weight = lambda n: modules[n].weight.detach()  # noqa: E731
    return GatedReader(weight(gate), weight(up), getattr(parent, triple[2]).weight.detach(), act)


def gated_readers(
    linears: list[str],
    modules: dict[str, nn.Module],
    block: MoEBlock | None,
    routing: Routing | None,
    names: SmoothingNames = SMOOTHING_NAMES,
) -> list[GatedReader] | None:
    """The gated MLPs reading a norm's output: the quantized dense ``linears`` (gate, up pairs in order) and,
    with ``block``, every expert the sampled tokens reach (by ``routing``). None where a reader is not part
    of a gated MLP without biases: the caller scores the Linears one by one instead."""
    if len(linears) % 2:
        return None
    readers = []
    for gate, up in zip(linears[0::2], linears[1::2], strict=True):
        reader = _gated_mlp(modules, gate, up, names)
        if reader is None:
            return None
        readers.append(reader)
    if block is not None:
        act = getattr(block.experts, "act_fn", None)
        if block.layout.has_bias or not callable(act) or routing is None:
            return None
        gate_up, down = block.experts.gate_up_proj.detach(), block.layout.down(block.experts.down_proj.detach())
        gates, ups = block.layout.gate(gate_up), block.layout.up(gate_up)
        for expert in range(block.num_experts):
            rows, weights = routing.tokens(expert)
            if rows.numel():
                readers.append(
                    GatedReader(gates[expert], ups[expert], down[expert], act, rows, weights, routing.weighs_input)
                )
    return readers or None
