"""Progress of a layer-by-layer calibration, saved as each layer finishes, so a killed run can go on.

Inside the export's staging directory (:attr:`quantport.export.output_dir.OutputTarget.resume_dir`), after
each decoder layer: that layer's statistics (``layers/K.safetensors``), the hidden states entering the next
layer (``hidden.safetensors``) and ``progress.json`` (layers done, and a fingerprint of the recipe, the
model's config and the calibration tokens). A run with ``--resume`` that finds them restores the finished
layers' statistics without reading their weights and starts at the next layer; the bytes it writes equal
an uninterrupted run's. Each file is written beside its final name and renamed, so a kill leaves whole files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration_statistics import quantizer_statistics, restore_quantizer_statistics
from ..errors import InvalidArgumentError

__all__ = [
    "LayerProgress",
    "fingerprint",
    "layer_statistics",
    "restore_layer_statistics",
]

logger = logging.getLogger(__name__)

PROGRESS = "progress.json"
HIDDEN = "hidden.safetensors"


def fingerprint(model: nn.Module, recipe: Any, tokens_digest: str) -> str:
    """What must be equal for a resumed run to give the same bytes: recipe, model config, calibration tokens."""
    digest = hashlib.sha256()
    digest.update(repr((recipe.name, recipe.scheme, recipe.kv_cache, recipe.exclude)).encode())
    digest.update(model.config.to_json_string(use_diff=False).encode())
    digest.update(tokens_digest.encode())
    return digest.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    partial = path.with_name(path.name + ".partial")
    save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, str(partial))
    os.replace(partial, path)


def _load(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


def layer_statistics(layer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The statistics a decoder layer's quantizers hold (names relative to the model)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in layer.named_modules(prefix=prefix.rstrip(".")):
        tensors.update(quantizer_statistics(name, module))
    return tensors


def restore_layer_statistics(
    layer: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], device: torch.device
) -> None:
    """Put saved statistics back on a decoder layer whose quantizers are attached (weight amax given at attach)."""
    for name, module in layer.named_modules(prefix=prefix.rstrip(".")):
        restore_quantizer_statistics(name, module, tensors, device)


@dataclass
class LayerProgress:
    """The saved progress of one layer-by-layer calibration in ``directory``."""

    directory: Path
    fingerprint: str
    device: torch.device

    def layers_done(self) -> int:
        """Layers finished by an earlier run with the same fingerprint (0: none); an error for another run's."""
        path = self.directory / PROGRESS
        if not path.is_file():
            return 0
        progress = json.loads(path.read_text())
        if progress.get("fingerprint") != self.fingerprint:
            raise InvalidArgumentError(
                "--resume found an interrupted run with another recipe, model or calibration data; run it with "
                "the same options, or without --resume"
            )
        return int(progress["layers_done"])

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        return _load(self.directory / "layers" / f"{index}.safetensors", self.device)

    def hidden(self) -> list[torch.Tensor]:
        saved = _load(self.directory / HIDDEN, self.device)
        return [saved[f"batch/{i}"] for i in range(len(saved))]

    def save(self, index: int, statistics: dict[str, torch.Tensor], hidden: list[torch.Tensor], tokens: int) -> None:
        """Layer ``index`` is done: its statistics, the next layer's inputs, then the progress that points at them."""
        (self.directory / "layers").mkdir(parents=True, exist_ok=True)
        _atomic_save(statistics, self.directory / "layers" / f"{index}.safetensors")
        _atomic_save({f"batch/{i}": h for i, h in enumerate(hidden)}, self.directory / HIDDEN)
        partial = self.directory / (PROGRESS + ".partial")
        partial.write_text(json.dumps({"fingerprint": self.fingerprint, "layers_done": index + 1, "tokens": tokens}))
        os.replace(partial, self.directory / PROGRESS)
