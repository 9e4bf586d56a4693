"""The calibration batches at the first decoder layer's input, and what the model's own forward passes to
every layer.

Each layer's ``forward`` is replaced for one pass by a recorder that keeps its arguments and returns the
hidden states unchanged; the pass stops after the last layer. The model's code thus computes, as it does
in a whole-model forward, the embeddings, the attention masks (per layer type: sliding or full), the
rotary embeddings and positions; nothing here knows a family.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibrate.loop import model_inputs
from ..errors import CalibrationDataError, QuantportError

__all__ = ["LayerInputs", "capture_layer_inputs"]


class _PassEnd(QuantportError):
    """Raised by the last layer's recorder: nothing after the decoder layers is needed (caught here, never
    seen by a user)."""


@dataclass
class LayerInputs:
    """Per calibration batch: the hidden states entering the current layer, and each layer's other
    arguments (the masks and rotary tensors are shared between layers, not copied).

    Attributes:
        hidden: the hidden states of each batch at the current layer's input (replaced layer by layer).
        calls: per layer, per batch, the positional arguments after the hidden states and the keywords.
        tokens: calibration tokens in all batches.
    """

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]]
    tokens: int = 0
    on_host: bool = field(default=False)
    digest: str = ""
    """sha256 of the calibration tokens (a resumed run must see the same)."""

    def batch(self, layer: int, index: int, device: torch.device) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
        args, kwargs = self.calls[layer][index]
        return self.hidden[index].to(device, non_blocking=True), args, kwargs

    def placed(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` where the hidden states are kept (host memory, or the device as computed)."""
        return hidden.to("cpu") if self.on_host else hidden

    def store(self, index: int, hidden: torch.Tensor) -> None:
        self.hidden[index] = self.placed(hidden)


def _recorder(layer: int, last: bool, inputs: LayerInputs):
    def record(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if layer == 0:
            inputs.hidden.append(hidden_states)
        inputs.calls[layer].append((args, kwargs))
        if last:
            raise _PassEnd
        return hidden_states

    return record


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: Iterable[Any],
    device: torch.device,
    *,
    on_host: bool = False,
    empty_ok: bool = False,
) -> LayerInputs:
    """Run ``batches`` through the model up to the first decoder layer (embeddings only: the layers are
    replaced by recorders) and keep each layer's call arguments. ``on_host``: keep the hidden states in
    host memory between layers (for activations larger than the device's free memory). ``empty_ok``: no
    batch is not an error (a rank's empty share of a distributed run)."""
    language_model = getattr(model, "language_model", None)
    target = language_model if isinstance(language_model, nn.Module) else model
    inputs = LayerInputs(hidden=[], calls=[[] for _ in layers], on_host=on_host)
    digest = hashlib.sha256()
    for i, layer in enumerate(layers):
        layer.forward = _recorder(i, i == len(layers) - 1, inputs)
    try:
        for batch in batches:
            arguments = model_inputs(batch, device)
            with contextlib.suppress(_PassEnd):
                target(**arguments, use_cache=False)
            ids = arguments.get("input_ids")
            if isinstance(ids, torch.Tensor):
                inputs.tokens += int(ids.numel())
                digest.update(ids.to("cpu").contiguous().numpy().tobytes())
            if on_host:
                inputs.hidden[-1] = inputs.hidden[-1].to("cpu")
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    if not inputs.hidden and not empty_ok:
        raise CalibrationDataError("calibration data is empty")
    inputs.digest = digest.hexdigest()
    return inputs
