"""Routing of sampled tokens by a MoE block's own router: experts and weights, as the family computes them."""

from __future__ import annotations

import torch

from moe_models import tiny_moe
from quantport.arch.experts import ForwardContract, find_moe_blocks
from quantport.calibrate.algorithms.routing import Routing, route


def _router(model, block):
    modules = dict(model.named_modules())
    return modules[f"{block.name}.{block.layout.router}"]


def test_tokens_of_an_expert_and_their_weights():
    routing = Routing(torch.tensor([[0, 2], [1, 2], [0, 1]]), torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]]))
    rows, weights = routing.tokens(2)
    assert rows.tolist() == [0, 1] and torch.allclose(weights, torch.tensor([0.3, 0.4]))
    rows, weights = routing.tokens(1)
    assert rows.tolist() == [1, 2] and torch.allclose(weights, torch.tensor([0.6, 0.1]))
    assert routing.tokens(3)[0].numel() == 0


def test_top_k_router_gives_renormalised_softmax_weights():
    model = tiny_moe("qwen3_moe")
    block = next(find_moe_blocks(model))
    router = _router(model, block)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    routing = route(router, block.layout.contract, x, top_k=2)
    probs = torch.softmax((x @ router.weight.T).float(), dim=-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(routing.indices, top.indices) and not routing.weighs_input
    expected = top.values / top.values.sum(dim=-1, keepdim=True)  # the tiny model's norm_topk_prob
    if not model.config.norm_topk_prob:
        expected = top.values
    assert torch.allclose(routing.weights, expected, atol=1e-2)


def test_dense_routed_router_weighs_the_input_with_the_sigmoid_of_the_top_logit():
    model = tiny_moe("llama4_text")
    block = next(find_moe_blocks(model))
    assert block.layout.contract is ForwardContract.DENSE_ROUTED
    router = _router(model, block)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    routing = route(router, block.layout.contract, x, top_k=1)
    logits = (x @ router.weight.T).float()
    assert routing.weighs_input
    assert torch.equal(routing.indices[:, 0], logits.argmax(dim=-1))
    assert torch.allclose(routing.weights[:, 0], torch.sigmoid(logits.amax(dim=-1)), atol=1e-2)


def test_a_router_of_another_form_falls_back_to_the_top_k_logits_with_weight_one():
    router = torch.nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        router.weight.copy_(torch.eye(3, 4))
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 0.0, 1.0, 0.0]])
    routing = route(router, ForwardContract.TOP_K, x, top_k=2)
    assert routing.indices.tolist() == [[1, 2], [0, 2]]
    assert torch.equal(routing.weights, torch.ones(2, 2))
