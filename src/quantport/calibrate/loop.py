"""The calibration forward loop: the unquantized model over the calibration batches."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CalibrationDataError

__all__ = ["run_calibration"]

logger = logging.getLogger(__name__)


def _model_inputs(batch: Any, device: torch.device) -> dict[str, Any]:
    if isinstance(batch, torch.Tensor):
        if batch.dim() != 2:
            raise CalibrationDataError(f"calibration batch must be input_ids [B, T], got shape {list(batch.shape)}")
        return {"input_ids": batch.to(device)}
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    raise CalibrationDataError(
        f"calibration batches must be input_ids tensors [B, T] or dicts of model inputs, got {type(batch).__name__}"
    )


@torch.inference_mode()
def run_calibration(model: nn.Module, batches: Iterable[Any], *, progress: bool = True) -> int:
    """Run the model over ``batches``; returns the number of tokens seen.

    The quantized modules must already be in calibration mode; this function only drives the forward.
    """
    device = next(model.parameters()).device
    # Multimodal wrappers (e.g. Llama4ForConditionalGeneration) run text-only batches through their
    # language model; transformers 5.24's Llama 4 wrapper fails building its output for text-only input.
    language_model = getattr(model, "language_model", None)
    target = language_model if isinstance(language_model, nn.Module) else model
    total = len(batches) if hasattr(batches, "__len__") else None
    tokens = 0
    for batch in tqdm(batches, total=total, desc="calibrating", unit="batch", disable=not progress):
        inputs = _model_inputs(batch, device)
        target(**inputs, use_cache=False)
        ids = inputs.get("input_ids")
        tokens += int(ids.numel()) if isinstance(ids, torch.Tensor) else 0
    if tokens == 0 and total == 0:
        raise CalibrationDataError("calibration data is empty")
    logger.info("calibrated on %d tokens", tokens)
    return tokens
