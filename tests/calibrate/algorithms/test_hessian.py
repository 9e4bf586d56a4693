"""Hessians from forward pre-hooks: X^T X / tokens of each Linear's input, one per fused group."""

from __future__ import annotations

import torch
from torch import nn

from quantport.calibrate.algorithms.hessian import HessianObserver


def test_hessian_is_the_mean_outer_product_and_siblings_share_it():
    torch.manual_seed(0)
    q, k, o = nn.Linear(8, 4), nn.Linear(8, 2), nn.Linear(4, 8)
    observer = HessianObserver.attach({"q": q, "k": k, "o": o}, groups=[("q", "k", "absent")])
    x1, x2 = torch.randn(2, 3, 8), torch.randn(5, 8)
    for x in (x1, x2):
        q(x), k(x)  # siblings read the same input: it is counted once
        o(q(x))
    observer.detach()
    rows = torch.cat([x1.reshape(-1, 8), x2])
    assert observer.accumulators["q"] is observer.accumulators["k"]
    assert observer.accumulators["q"].tokens == 2 * rows.shape[0]  # q ran twice per batch here
    assert torch.allclose(observer.accumulators["q"].hessian(), rows.T @ rows / rows.shape[0], atol=1e-6)
    q(x1)  # hooks removed: nothing more is recorded
    assert observer.accumulators["q"].tokens == 2 * rows.shape[0]


def test_a_layer_that_never_ran_has_no_hessian():
    observer = HessianObserver.attach({"unused": nn.Linear(4, 4)})
    assert observer.accumulators["unused"].hessian() is None
