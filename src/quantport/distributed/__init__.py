"""Calibration over several processes with torch.distributed (``torchrun``; NCCL on GPUs, gloo on CPUs).

Every rank loads the whole model and calibrates its share of the batches (:mod:`.batches`); the statistics
are then reduced over all ranks (:mod:`.model_statistics`, :mod:`.statistics`), so every rank holds what one
process would have computed over all batches; rank 0 writes the checkpoint and renames it into place once
every rank voted that it succeeded (:mod:`.agreement`, :mod:`.session`). A model opened layer by layer
(``--sequential``) keeps only its share of the batches' hidden states, reduces each decoder layer's
statistics before the next layer (:mod:`.layers`), and every rank writes its share of the shard files
(:mod:`.shard_writers`). Outside a distributed run every
function here is a no-op, so the pipeline, ``export`` and the CLI call them unconditionally.
"""

from __future__ import annotations

from .agreement import (
    agreed_batch_size,
    all_ranks_agree,
    commit_when_all_agree,
    committed_by_rank_zero,
    distributed_command,
    failures_shared,
    in_distributed_run,
    progress_here,
    writes_checkpoint,
    written_by_rank_zero,
)
from .batches import RankShare, rank_share
from .layers import agree_on_layer, agreed_tokens
from .model_statistics import agree_on_statistics
from .session import RankSession, close_session, current_session, launched_by_torchrun, rank_device
from .statistics import Statistics, reduce_statistics

__all__ = [
    "RankSession",
    "RankShare",
    "Statistics",
    "agree_on_layer",
    "agree_on_statistics",
    "agreed_batch_size",
    "agreed_tokens",
    "all_ranks_agree",
    "close_session",
    "commit_when_all_agree",
    "committed_by_rank_zero",
    "current_session",
    "distributed_command",
    "failures_shared",
    "in_distributed_run",
    "launched_by_torchrun",
    "progress_here",
    "rank_device",
    "rank_share",
    "reduce_statistics",
    "writes_checkpoint",
    "written_by_rank_zero",
]
