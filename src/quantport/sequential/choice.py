"""Whether a model runs whole or layer by layer, when the user did not say (``--sequential`` / ``--no-sequential``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..loading import is_dequantizing_source

__all__ = ["choose_layer_by_layer"]

logger = logging.getLogger(__name__)


HEADROOM = 0.8
"""Share of the free memory the weights may take on the whole-model path (the rest: activations, scales)."""


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: assume it fits, as before this choice existed


def choose_layer_by_layer(directory: Path, config: dict[str, Any], device: torch.device) -> tuple[bool, str]:
    """(layer by layer?, why) for the model in ``directory`` on ``device``."""
    if is_dequantizing_source(config):
        method = config["quantization_config"]["quant_method"]
        return True, f"the checkpoint is {method}-quantized: it is dequantized one layer at a time"
    stored = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    free = _free_bytes(device)
    if stored > HEADROOM * free:
        return (
            True,
            f"the weights ({stored / 2**30:.1f} GiB) do not fit the free {device.type} memory ({free / 2**30:.1f} GiB)",
        )
    return False, f"the weights ({stored / 2**30:.1f} GiB) fit the free {device.type} memory ({free / 2**30:.1f} GiB)"
