"""Models of any size on one device: quantized one decoder layer at a time.

:func:`open_layer_by_layer` builds the model without weights, reads only what every layer's forward
needs (embeddings, final norm, output head), and keeps the source on the model;
:func:`quantport.quantize` then reads, calibrates and drops one decoder layer at a time, and
:func:`quantport.export` reads each layer again while its tensors are written. Every statistic and every
exported byte is the same as for the model loaded whole (activations propagate unquantized).

Under ``torchrun`` each rank opens the model the same way, keeps the hidden states of its own share of the
calibration batches, and the statistics of each decoder layer are reduced over the ranks before the next
layer; each rank then writes its share of the shard files (:mod:`quantport.distributed.layers`,
:mod:`quantport.distributed.shard_writers`). The bytes are those of one process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..sources.base import WeightSource
from .attached import attach_layer_store, layer_store_of
from .host_memory import bound_onednn_caches
from .layer_store import LayerStore
from .skeleton import build_skeleton

__all__ = ["layer_store_of", "open_layer_by_layer"]

logger = logging.getLogger(__name__)


def open_layer_by_layer(
    directory: str | Path,
    *,
    device: str | torch.device = "cpu",
    source: WeightSource | None = None,
    activations_on_host: bool = False,
) -> nn.Module:
    """The model of ``directory`` (its ``config.json``; weights from ``source``, by default the directory's
    safetensors files, FP8-block and MXFP4 checkpoints dequantized a layer at a time), ready for
    :func:`quantport.quantize` and :func:`quantport.export` one decoder layer at a time on ``device``.

    ``activations_on_host``: keep the calibration hidden states in host memory between layers (when they do
    not fit the device beside one layer).
    """
    from ..sources import open_source

    bound_onednn_caches()  # before anything of this process multiplies matrices on the CPU
    directory = Path(directory)
    source = source if source is not None else open_source(directory)
    floats = [i.dtype for i in source.tensors().values() if i.dtype.is_floating_point]
    skeleton = build_skeleton(directory, floats[0] if floats else None)
    store = LayerStore(skeleton, source, device, activations_on_host=activations_on_host)
    store.load_resident()
    attach_layer_store(skeleton.model, store)
    logger.info(
        "opened %s layer by layer: %d decoder layers read one at a time onto %s",
        directory,
        len(skeleton.layers),
        store.device,
    )
    return skeleton.model
