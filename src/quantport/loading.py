"""Find and load a Hugging Face causal LM from a local directory, a hub id, or the bundled demo model."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError

__all__ = ["BUNDLED_MODELS", "load_model", "resolve_device", "resolve_model_dir"]

logger = logging.getLogger(__name__)

BUNDLED_MODELS = {"bundled:tiny-llama": "tiny_llama"}
"""Model names that resolve to directories shipped inside the package (no network)."""

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def _has_weights(directory: Path) -> bool:
    return any(any(directory.glob(p)) for p in WEIGHT_PATTERNS)


def resolve_model_dir(model: str | Path) -> Path:
    """A local directory holding ``config.json`` and weights for ``model``.

    ``model`` is a local directory, a bundled name (``bundled:tiny-llama``) or a Hugging Face hub id,
    which is downloaded (config, safetensors weights and tokenizer only) into the hub cache.
    """
    text = str(model)
    if text in BUNDLED_MODELS:
        return Path(str(resources.files("quantport.data").joinpath(BUNDLED_MODELS[text])))
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; MODEL must be a model directory or a hub id")
        directory = path
    elif text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelLoadError(f"model directory {text!r} does not exist (and it is not a hub id like 'org/name')")
    else:
        directory = _download(text)
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} has no config.json; it is not a Hugging Face model directory")
    if not _has_weights(directory):
        raise ModelLoadError(
            f"{directory} has no weights (no *.safetensors or *.bin files); download the full model "
            "or point MODEL at the directory that holds its weight shards"
        )
    return directory


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
            )
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not fetch {repo_id!r} from the Hugging Face hub: {exc}") from exc


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (CUDA when available) as a torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda or auto")
    return torch.device(device)


def load_model(model: str | Path, *, device: str = "auto") -> tuple[nn.Module, Path]:
    """Load the causal LM in its stored dtype on ``device``; returns (model, its directory)."""
    from transformers import AutoModelForCausalLM

    directory = resolve_model_dir(model)
    target = resolve_device(device)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(directory, dtype="auto", device_map=str(target))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"transformers could not load {directory}: {exc}") from exc
    loaded.eval()
    logger.info("loaded %s (%s) on %s", directory, type(loaded).__name__, target)
    return loaded, directory
