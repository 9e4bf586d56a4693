"""The layer-by-layer path under torchrun: each rank runs its share of the batches through every decoder layer.

Each rank captures the hidden states of its own batches only (:func:`~.batches.rank_share`), so its
activation memory is its share of the total. Per decoder layer, after every rank ran its batches through
it in calibration mode, the ranks vote (a rank that failed in that layer stops every rank there) and the
layer's statistics are reduced as the whole-model path reduces the model's (:mod:`.model_statistics`:
amax by MAX, token counts by SUM), so every rank holds what one process would have computed over all the
batches before the next layer starts. Outside a distributed run each function is a no-op.
"""

from __future__ import annotations

import logging

from torch import nn

from ..input_checks import check_finite_statistics
from .model_statistics import collect_statistics, store_statistics
from .session import current_session
from .statistics import reduce_statistics

__all__ = ["agree_on_layer", "agreed_tokens"]

logger = logging.getLogger(__name__)


def agreed_tokens(tokens: int) -> int:
    """The calibration tokens of every rank's batches (after each captured its layer inputs); ``tokens``
    outside a distributed run."""
    session = current_session()
    if session is None:
        return tokens
    return sum(session.agree("calibration inputs captured", tokens))


def agree_on_layer(layer: nn.Module, index: int) -> None:
    """In a distributed run: after decoder layer ``index`` was calibrated on this rank's batches, check its
    statistics, vote, and replace them by their reduction over every rank (the same on every rank)."""
    session = current_session()
    if session is None:
        return
    check_finite_statistics(layer)  # a rank whose own statistics are not finite fails with that message
    session.agree(f"decoder layer {index} calibrated")
    reduced = reduce_statistics(collect_statistics(layer, None, 0), session)
    store_statistics(layer, None, reduced)
    logger.debug("decoder layer %d: statistics of %d ranks reduced", index, session.world_size)
