"""The grouped calibration statistics equal a plain per-expert loop, bit for bit, on every MoE family.

quantport calibrates fused experts with one grouped GEMM per projection and collects token counts and
input amax with segmented reductions over the rows sorted by expert. This test recomputes the same
statistics the simple way the reference tool does (a Python loop over experts, one GEMM each, on the
experts module's captured inputs) and requires exact equality: token counts, and the per-expert amax of
the gate/up input and of the down input, with a dead expert (no tokens routed) in every layer.
"""

from __future__ import annotations

import pytest
import torch

import quantport
from moe_models import FAMILIES, silence_expert, tiny_moe
from quantport.arch.experts import ForwardContract, MoEBlock, find_moe_blocks
from quantport.modules.quant_experts import experts_quantizer_of
from tiny_models import make_calibration_batches

BATCHES = make_calibration_batches(vocab_size=256, n=3, batch=2, seq=32)
DEAD = 2


def _capture(block: MoEBlock, store: list[tuple[torch.Tensor, ...]]):
    """Record the experts module's inputs as it sees them (after routing hooks such as silence_expert)."""

    def hook(module, args):
        store.append(tuple(a.detach().clone() for a in args))

    return block.experts.register_forward_pre_hook(hook)


def _gate_up_input(block: MoEBlock, rows: torch.Tensor, expert: int) -> torch.Tensor:
    """Input of the down projection of ``expert`` for ``rows``: gate(rows @ gate_up + bias)."""
    experts, layout = block.experts, block.layout
    weight = experts.gate_up_proj[expert]
    out = rows @ (weight if layout.transposed else weight.transpose(0, 1))
    if layout.has_bias:
        out = out + experts.gate_up_proj_bias[expert]
    return out


@torch.no_grad()
def _reference_top_k(block: MoEBlock, calls: list[tuple[torch.Tensor, ...]]):
    experts = block.experts
    n = block.num_experts
    tokens = torch.zeros(n, dtype=torch.int64)
    amax = {"gate_up": torch.zeros(n), "down": torch.zeros(n)}
    for hidden, top_k_index, _weights in calls:
        for expert in range(n):
            token_idx, _ = torch.where(top_k_index == expert)
            tokens[expert] += token_idx.numel()
            if token_idx.numel() == 0:
                continue
            rows = hidden[token_idx]
            h = experts._apply_gate(_gate_up_input(block, rows, expert))
            amax["gate_up"][expert] = max(amax["gate_up"][expert], rows.abs().max().float())
            amax["down"][expert] = max(amax["down"][expert], h.abs().max().float())
    return tokens, amax


@torch.no_grad()
def _reference_dense_routed(block: MoEBlock, calls: list[tuple[torch.Tensor, ...]]):
    experts = block.experts
    n = block.num_experts
    tokens = torch.zeros(n, dtype=torch.int64)
    amax = {"gate_up": torch.zeros(n), "down": torch.zeros(n)}
    for (hidden,) in calls:
        x = hidden.view(n, -1, hidden.shape[-1])
        for expert in range(n):
            rows = x[expert]
            tokens[expert] += int((rows != 0).any(dim=-1).sum())
            gate, up = (rows @ experts.gate_up_proj[expert]).chunk(2, dim=-1)
            h = up * experts.act_fn(gate)
            amax["gate_up"][expert] = max(amax["gate_up"][expert], rows.abs().max().float())
            amax["down"][expert] = max(amax["down"][expert], h.abs().max().float())
    return tokens, amax


@pytest.mark.parametrize("recipe", ["fp8", "nvfp4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_statistics_equal_per_expert_loop(family, recipe):
    model = tiny_moe(family)
    silence_expert(model, DEAD)
    blocks = list(find_moe_blocks(model))
    assert blocks
    calls: dict[str, list[tuple[torch.Tensor, ...]]] = {b.experts_name: [] for b in blocks}
    handles = [_capture(b, calls[b.experts_name]) for b in blocks]
    quantport.quantize(model, recipe, BATCHES, progress=False)
    for handle in handles:
        handle.remove()

    for block in blocks:
        assert len(calls[block.experts_name]) == len(BATCHES)
        quantizer = experts_quantizer_of(block.experts)
        if block.layout.contract is ForwardContract.DENSE_ROUTED:
            tokens, amax = _reference_dense_routed(block, calls[block.experts_name])
        else:
            tokens, amax = _reference_top_k(block, calls[block.experts_name])
        assert tokens[DEAD] == 0 and amax["gate_up"][DEAD] == 0 and amax["down"][DEAD] == 0
        assert torch.equal(quantizer.tokens, tokens), (block.name, quantizer.tokens, tokens)
        for projection in ("gate_up", "down"):
            observed = quantizer.input_amax[projection]
            assert observed.dtype == torch.float32
            assert torch.equal(observed, amax[projection]), (block.name, projection, observed, amax[projection])
