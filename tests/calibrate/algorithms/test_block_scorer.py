"""AWQ's block-output score of an MLP norm's scale, on hand-computed gated MLPs (a codec that rounds to integers)."""

from __future__ import annotations

import pytest
import torch

from moe_models import tiny_moe
from quantport.arch.experts import find_moe_blocks
from quantport.calibrate.algorithms.block_scorer import GatedMlpScorer, GatedReader, gated_readers
from quantport.calibrate.algorithms.routing import Routing


class _RoundCodec:
    """Weights rounded to integers, inputs kept: the hand-computable stand-in of a codec."""

    static_input_scale = False

    def quantize_weight(self, weight, amax):
        return weight.float().round()

    def dequantize_weight(self, q, dtype):
        return q.to(dtype)

    def fake_quantize_input(self, x, scale):
        return x


def _reader(down=1.0, **kwargs):
    one = lambda v: torch.tensor([[v]])  # noqa: E731
    return GatedReader(one(1.0), one(0.4), one(down), lambda t: t, **kwargs)


def test_scale_one_and_a_better_scale_by_hand():
    x = torch.tensor([[2.0]])
    scorer = GatedMlpScorer(_RoundCodec(), x, [_reader()])
    # reference (2 * 1) * (2 * 0.4) = 1.6; up rounds to 0 -> output 0
    assert scorer.error(torch.tensor([1.0])) == pytest.approx(2.56)
    # s = 2.5: gate 2.5 -> 2 (half to even), up 1.0 -> 1, input 0.8: (0.8 * 2) * (0.8 * 1) = 1.28
    assert scorer.error(torch.tensor([2.5])) == pytest.approx((1.6 - 1.28) ** 2)


def test_experts_of_one_token_add_before_the_square():
    x = torch.tensor([[2.0]])
    scorer = GatedMlpScorer(_RoundCodec(), x, [_reader(1.0), _reader(-1.0)])
    assert scorer.error(torch.tensor([1.0])) == pytest.approx(0.0)  # +1.6 and -1.6 lost together: no block error


def test_routing_weights_on_the_output_and_on_the_input():
    x = torch.tensor([[2.0], [5.0]])
    rows, weights = torch.tensor([0]), torch.tensor([0.5])
    on_output = GatedMlpScorer(_RoundCodec(), x, [_reader(rows=rows, weights=weights)])
    assert on_output.error(torch.tensor([1.0])) == pytest.approx(0.25 * 2.56)  # token 1 is not routed here
    on_input = GatedMlpScorer(_RoundCodec(), x, [_reader(rows=rows, weights=weights, weighs_input=True)])
    assert on_input.error(torch.tensor([1.0])) == pytest.approx(0.4**2)  # input 1: (1 * 1) * (1 * 0.4)


@pytest.mark.parametrize("family", ["qwen3_moe", "llama4_text"])
def test_gated_readers_of_a_moe_block(family):
    model = tiny_moe(family)
    modules = dict(model.named_modules())
    block = next(find_moe_blocks(model))
    routing = Routing(torch.tensor([[0], [1], [1]]), torch.ones(3, 1))
    shared = [f"{block.name}.shared_expert.gate_proj", f"{block.name}.shared_expert.up_proj"]
    linears = shared if f"{block.name}.shared_expert" in modules else []
    readers = gated_readers(linears, modules, block, routing)
    assert readers is not None and len(readers) == len(linears) // 2 + 2  # experts 0 and 1 reached
    assert readers[-1].rows.tolist() == [1, 2]
    if linears:  # Llama 4's shared expert
        assert gated_readers(linears[:1], modules, block, routing) is None  # a gate without its up: no gated MLP
