"""Plans are built with the garbage collector paused, and its state is restored."""

from __future__ import annotations

import gc

from quantport.export.content import planning


def test_planning_pauses_the_garbage_collector_and_restores_it():
    assert gc.isenabled()
    with planning():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with planning():
            pass
        assert not gc.isenabled()  # left as it was found
    finally:
        gc.enable()
