"""The live-tensor meter the memory tests rely on counts allocations, not views or in-place results."""

from __future__ import annotations

import torch

from live_memory import LiveBytes, storage_bytes


def test_allocations_are_counted_until_freed_and_views_are_not():
    with LiveBytes() as live:
        a = torch.empty(1000, dtype=torch.float32)
        view = a[10:20].view(2, 5)
        a.mul_(2)
        b = a.to(torch.bfloat16)
        assert live.now == 4000 + 2000
        del a
        assert live.now == 6000  # the view keeps the storage
        del view, b
        c = torch.zeros(100, dtype=torch.uint8)
    assert (live.peak, live.now) == (6000, 100)
    assert storage_bytes([c, c[:10]]) == 100
