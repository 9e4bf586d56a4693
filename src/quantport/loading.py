"""Find and load a Hugging Face causal LM from a local directory, a hub id, or the bundled demo model."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MissingWeightsError, ModelLoadError

if TYPE_CHECKING:  # torch and transformers are imported when a model is loaded, not when a path is checked
    from collections.abc import Iterator

    import torch
    from torch import nn

__all__ = [
    "BUNDLED_MODELS",
    "check_loading_info",
    "load_model",
    "open_model",
    "read_model_config",
    "resolve_device",
    "resolve_model_dir",
]

logger = logging.getLogger(__name__)

BUNDLED_MODELS = {"bundled:tiny-llama": "tiny_llama"}
"""Model names that resolve to directories shipped inside the package (no network)."""

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


DEQUANTIZING_METHODS = ("fp8", "mxfp4")
"""``quantization_config.quant_method`` of the checkpoints the layer-by-layer path reads and dequantizes
(:mod:`quantport.sources`: FP8 128x128 blocks, gpt-oss MXFP4 experts)."""


def is_dequantizing_source(config: dict[str, Any]) -> bool:
    """Whether ``config.json`` describes a checkpoint only the layer-by-layer path reads (FP8 blocks, MXFP4)."""
    qconfig = config.get("quantization_config")
    return isinstance(qconfig, dict) and qconfig.get("quant_method") in DEQUANTIZING_METHODS


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


def read_model_config(directory: Path) -> dict[str, Any]:
    """The model's ``config.json`` as a dict (cheap: no weights, no torch)."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} cannot be read as JSON ({exc}); restore the model's config.json") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} is not a JSON object; restore the model's config.json")
    return config


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (CUDA when available) as a torch device."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda or auto")
    return torch.device(device)


def _shown(keys: Collection[str], limit: int = 5) -> str:
    names = sorted(keys)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_loading_info(directory: Path, info: dict[str, Any]) -> None:
    """Refuse a model whose parameters did not all come from the checkpoint files.

    ``info`` is transformers' ``output_loading_info`` dict. Tied weights are not missing (transformers takes
    them out), and keys the model declares ignorable (``_keys_to_ignore_on_load_*``, e.g. DeepSeek-V3's MTP
    layers) are filtered by transformers already. Missing or mismatched keys would be filled with random
    values: an error, listing the unexpected keys too (with missing keys they mean a key prefix that does
    not match). Unexpected keys alone are dropped by transformers: a warning.
    """
    missing = set(info.get("missing_keys") or ())
    unexpected = set(info.get("unexpected_keys") or ())
    mismatched = {key[0] if isinstance(key, tuple) else key for key in info.get("mismatched_keys") or ()}
    if missing or mismatched:
        parts = [f"{len(missing)} missing ({_shown(missing)})"] if missing else []
        parts += [f"{len(mismatched)} with a different shape ({_shown(mismatched)})"] if mismatched else []
        parts += [f"{len(unexpected)} unexpected ({_shown(unexpected)})"] if unexpected else []
        raise MissingWeightsError(
            f"the weights in {directory} do not match its config.json: {'; '.join(parts)} parameter(s); "
            "transformers would fill them with random values. Fix the checkpoint (a key prefix that does not "
            "match, or a config with more layers than the weights) or point MODEL at the matching config"
        )
    if unexpected:
        logger.warning(
            "%s: %d checkpoint tensor(s) the model does not use are ignored: %s",
            directory,
            len(unexpected),
            _shown(unexpected),
        )


@contextmanager
def quiet_transformers_loading(progress: bool) -> Iterator[None]:
    """transformers logs its load report as a multi-line warning (:func:`check_loading_info` reports what
    matters, as one error); its progress bar follows ``progress``."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(model: str | Path, *, device: str = "auto", progress: bool = True) -> tuple[nn.Module, Path]:
    """Load the causal LM in its stored dtype on ``device``; returns (model, its directory).

    Raises :class:`MissingWeightsError` when a parameter of the model is not in the checkpoint files.
    """
    from transformers import AutoModelForCausalLM

    directory = resolve_model_dir(model)
    target = resolve_device(device)
    try:
        with quiet_transformers_loading(progress):
            loaded, info = AutoModelForCausalLM.from_pretrained(
                directory, dtype="auto", device_map=str(target), output_loading_info=True
            )
    except Exception as exc:  # noqa: BLE001
        reason = " ".join(str(exc).split())  # one line: transformers' messages span several
        raise ModelLoadError(f"transformers could not load {directory}: {reason[:500]}") from exc
    check_loading_info(directory, info)
    loaded.eval()
    logger.info("loaded %s (%s) on %s", directory, type(loaded).__name__, target)
    return loaded, directory


def open_model(
    model: str | Path, *, device: str = "auto", sequential: bool | None = None, progress: bool = True
) -> tuple[nn.Module, Path, str]:
    """The model whole (:func:`load_model`) or layer by layer (:func:`quantport.sequential.open_layer_by_layer`):
    ``sequential`` None chooses from its size and format. Returns (model, its directory, why that path)."""
    from .sequential.choice import choose_layer_by_layer

    directory = resolve_model_dir(model)
    target = resolve_device(device)
    if sequential is None:
        sequential, why = choose_layer_by_layer(directory, read_model_config(directory), target)
    else:
        why = "--sequential" if sequential else "--no-sequential"
    if not sequential:
        loaded, directory = load_model(model, device=device, progress=progress)
        return loaded, directory, why
    from .sequential import open_layer_by_layer

    return open_layer_by_layer(directory, device=target), directory, why
