"""The calibration forward loop: the unquantized model over the calibration batches."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CalibrationDataError

__all__ = ["auto_batch_size", "model_inputs", "run_calibration"]

logger = logging.getLogger(__name__)


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-GPU copies go through pinned memory, asynchronously: a pageable copy would wait for the
    GPU to finish the previous batch (one host synchronisation per batch)."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def model_inputs(batch: Any, device: torch.device) -> dict[str, Any]:
    if isinstance(batch, torch.Tensor):
        if batch.dim() != 2:
            raise CalibrationDataError(f"calibration batch must be input_ids [B, T], got shape {list(batch.shape)}")
        return {"input_ids": _to_device(batch, device)}
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    raise CalibrationDataError(
        f"calibration batches must be input_ids tensors [B, T] or dicts of model inputs, got {type(batch).__name__}"
    )


@torch.no_grad()  # not inference_mode: its tensors have no version counter, which sibling amax sharing needs
def run_calibration(
    model: nn.Module, batches: Iterable[Any], *, progress: bool = True, empty_share_ok: bool = False
) -> int:
    """Run the model over ``batches``; returns the number of tokens seen.

    The quantized modules must already be in calibration mode; this function only drives the forward.
    ``empty_share_ok``: ``batches`` is one rank's share of a distributed run's batches, which may be empty
    (:class:`quantport.distributed.RankShare` raises when all of them are).
    """
    device = next(model.parameters()).device
    # Multimodal wrappers (e.g. Llama4ForConditionalGeneration) run text-only batches through their
    # language model; transformers 5.24's Llama 4 wrapper fails building its output for text-only input.
    language_model = getattr(model, "language_model", None)
    target = language_model if isinstance(language_model, nn.Module) else model
    total = len(batches) if hasattr(batches, "__len__") else None
    tokens = 0
    for batch in tqdm(batches, total=total, desc="calibrating", unit="batch", disable=not progress):
        inputs = model_inputs(batch, device)
        target(**inputs, use_cache=False)
        ids = inputs.get("input_ids")
        tokens += int(ids.numel()) if isinstance(ids, torch.Tensor) else 0
    if tokens == 0 and total == 0 and not empty_share_ok:
        raise CalibrationDataError("calibration data is empty")
    logger.info("calibrated on %d tokens", tokens)
    return tokens


@torch.inference_mode()
def auto_batch_size(
    model: nn.Module,
    seq_len: int,
    *,
    memory_fraction: float = 0.6,
    probe_batch: int = 2,
    max_batch: int = 128,
    cpu_batch: int = 8,
) -> int:
    """Sequences of ``seq_len`` tokens per calibration forward that fill the GPU's free memory.

    Measures the peak memory of one forward of ``probe_batch`` random sequences (run it before
    calibration mode is on: the probe must not touch the statistics) and scales it to
    ``memory_fraction`` of the memory free after the probe; ``cpu_batch`` off the GPU.
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        return cpu_batch
    language_model = getattr(model, "language_model", None)
    target = language_model if isinstance(language_model, nn.Module) else model
    ids = torch.randint(0, target.config.get_text_config().vocab_size, (probe_batch, seq_len), device=device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    target(input_ids=ids, use_cache=False)
    per_sequence = max(1, (torch.cuda.max_memory_allocated(device) - base) // probe_batch)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch
    batch = int(free * memory_fraction) // per_sequence
    logger.info("auto calibration batch: %d x %d tokens (%.1f MB per sequence)", batch, seq_len, per_sequence / 1e6)
    return max(1, min(max_batch, batch))
