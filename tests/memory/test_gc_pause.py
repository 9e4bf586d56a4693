"""The garbage collector paused for an export's Python-heavy stages, and left as it was found."""

from __future__ import annotations

import gc

from quantport.memory.gc_pause import paused_gc


def test_the_collector_is_paused_inside_and_restored_after():
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()
