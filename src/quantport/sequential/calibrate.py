"""Quantization one decoder layer at a time: the calibration half of the layer-sequential path.

For each decoder layer: its tensors are read onto the device, its quantizers attached (weight amax from
the real weights), the cached hidden states of every calibration batch run through it in calibration mode
(activations propagate unquantized, as in a whole-model forward, so every statistic is the same), its
outputs become the next layer's inputs, and its tensors are dropped. The statistics stay on the modules
(on the meta device otherwise); export reads each layer's weights again (:mod:`.streaming`). Under torchrun
each rank runs its own batches through the layer and the layer's statistics are reduced over the ranks
(:func:`quantport.distributed.agree_on_layer`) before its outputs feed the next layer's calibration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch.experts import MoEBlock
from ..calibration_statistics import saved_weight_amax
from ..distributed import agree_on_layer, agreed_tokens, in_distributed_run, progress_here
from ..modules.quant_experts import ExpertsQuantizer, experts_quantizer_of
from ..modules.quant_linear import QuantLinear, QuantMode
from ..state import QuantizationState, set_mode
from .capture import LayerInputs, capture_layer_inputs
from .host_memory import bound_onednn_caches, release_freed_memory
from .layer_store import LayerStore
from .memory import MemoryPeaks
from .resume import LayerProgress, fingerprint, layer_statistics, restore_layer_statistics

__all__ = ["Propagation", "quantize_layer_by_layer"]

logger = logging.getLogger(__name__)


def _in_layer(name: str, prefix: str) -> bool:
    return name.startswith(prefix)


class Propagation(str, Enum):
    """What each decoder layer's calibration sees as its input."""

    UNQUANTIZED = "unquantized"
    """The full-precision outputs of the layer before, as in a whole-model forward (statistics and bytes equal
    the whole-model path's)."""
    QUANTIZED = "quantized"
    """The outputs of the layer before as the engine computes them (simulated quantization): each layer is
    calibrated on the errors of the ones before, which error-correcting algorithms (GPTQ) build on."""


@torch.no_grad()
def _run_layer(layer: nn.Module, index: int, inputs: LayerInputs, device: torch.device, *, keep: bool) -> None:
    for b in range(len(inputs.hidden)):
        hidden, args, kwargs = inputs.batch(index, b, device)
        output = layer(hidden, *args, **kwargs)
        if keep:
            inputs.store(b, output[0] if isinstance(output, tuple) else output)


def _run_quantized(layer: nn.Module, index: int, inputs: LayerInputs, device: torch.device) -> None:
    """The layer's outputs with its quantization simulated; the simulation's weight copies dropped after."""
    set_mode(layer, QuantMode.SIMULATE)
    try:
        _run_layer(layer, index, inputs, device, keep=True)
    finally:
        set_mode(layer, QuantMode.OFF)
        for module in layer.modules():
            if isinstance(module, QuantLinear):
                module.cache_simulated_weight(False)
            experts = experts_quantizer_of(module)
            if experts is not None:
                experts.drop_simulation()


def quantize_layer_by_layer(
    model: nn.Module,
    store: LayerStore,
    names: list[str],
    blocks: list[MoEBlock],
    attach: Callable[..., list[ExpertsQuantizer]],
    batches: Iterable[Any] | None,
    state: QuantizationState,
    *,
    progress: bool = True,
    resume_dir: Path | None = None,
    propagate: Propagation = Propagation.UNQUANTIZED,
    finish_layer: Callable[[str, list[ExpertsQuantizer]], None] | None = None,
) -> list[ExpertsQuantizer]:
    """Attach and calibrate the planned modules (``names``, ``blocks``) layer by layer; returns the experts
    quantizers. ``attach(names, blocks)`` attaches the quantizers of some planned modules (weights loaded).
    ``batches`` None: no forward is needed (weight-only), each layer is only read once for its weight amax.
    ``resume_dir``: save the progress there as layers finish, and go on from an interrupted run's (:mod:`.resume`).
    ``propagate``: what the next layer sees; with :attr:`Propagation.QUANTIZED`, ``finish_layer(prefix, experts)``
    completes a layer's statistics before its quantized outputs are computed."""
    skeleton = store.skeleton
    peaks = MemoryPeaks(store.device)
    bound_onednn_caches()
    inside = [skeleton.layer_name(i) + "." for i in range(len(skeleton.layers))]
    outside_names = [n for n in names if not any(_in_layer(n, p) for p in inside)]
    experts = attach(outside_names, [b for b in blocks if not any(_in_layer(b.experts_name, p) for p in inside)])
    inputs = None
    if batches is not None:
        inputs = capture_layer_inputs(
            model,
            skeleton.layers,
            batches,
            store.device,
            on_host=store.activations_on_host,
            empty_ok=in_distributed_run(),  # torchrun: a rank may have no batch (more ranks than batches)
        )
        state.calibration_tokens = agreed_tokens(inputs.tokens)  # torchrun: every rank's, summed
        logger.info("calibration: %d tokens in %d batches here", inputs.tokens, len(inputs.hidden))
    saved = None
    if resume_dir is not None:
        tokens = (inputs.digest if inputs else "") + propagate.value
        saved = LayerProgress(resume_dir, fingerprint(model, state.recipe, tokens), store.device)
    done = saved.layers_done() if saved is not None else 0
    if done:
        logger.info("resuming after layer %d of %d (%s)", done - 1, len(skeleton.layers), resume_dir)
        if inputs is not None:
            inputs.hidden = [inputs.placed(h) for h in saved.hidden()]
    bar = tqdm(range(len(skeleton.layers)), desc="layers", unit="layer", disable=not progress_here(progress))
    for index in bar:
        prefix = inside[index]
        layer_names = [n for n in names if _in_layer(n, prefix)]
        layer_blocks = [b for b in blocks if _in_layer(b.experts_name, prefix)]
        if index < done:  # finished by the interrupted run: its statistics, not its weights
            statistics = saved.layer(index)
            amax = saved_weight_amax(statistics, layer_names, [b.experts_name for b in layer_blocks], store.device)
            experts += attach(layer_names, layer_blocks, amax)
            restore_layer_statistics(skeleton.layers[index], prefix, statistics, store.device)
            continue
        layer = store.load(index)
        attached = attach(layer_names, layer_blocks)
        experts += attached
        if inputs is not None:
            quantized = propagate is Propagation.QUANTIZED
            set_mode(layer, QuantMode.CALIBRATE)
            try:
                _run_layer(layer, index, inputs, store.device, keep=not quantized)
            finally:
                set_mode(layer, QuantMode.OFF)
            agree_on_layer(layer, index)  # torchrun: the layer's statistics reduced over every rank's batches
            if quantized:
                finish_layer(prefix, attached)
                _run_quantized(layer, index, inputs, store.device)
        store.free(index)
        release_freed_memory()
        if saved is not None:
            saved.save(
                index, layer_statistics(layer, prefix), inputs.hidden if inputs else [], state.calibration_tokens
            )
        bar.set_postfix_str(peaks.sample().postfix())
    state.path = "layer-by-layer"
    state.memory = peaks.summary()
    return experts
