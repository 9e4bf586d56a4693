"""The model without its weights: built on the meta device, decoder layers found, the rest made real.

The layer-sequential path never holds the whole model. It builds the model's modules on the meta device
(no memory), finds the decoder layers (the ``ModuleList`` the model's own forward loops over), and gives
real tensors only to what every layer's forward needs: the embeddings, the final norm, the output head
and the rotary embedding. Decoder layers get their tensors one at a time (:mod:`.layer_store`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError

__all__ = ["Skeleton", "build_skeleton", "decoder_layers"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skeleton:
    """A model built on the meta device and where its decoder layers are.

    Attributes:
        model: the causal LM, every tensor on the meta device.
        layers_name: module name of the decoder layers' ``ModuleList`` (e.g. ``model.layers``).
        dtype: the dtype the model computes in (the one ``from_pretrained(dtype="auto")`` chooses).
    """

    model: nn.Module
    layers_name: str
    dtype: torch.dtype

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_name)  # type: ignore[return-value]

    def layer_name(self, index: int) -> str:
        return f"{self.layers_name}.{index}"


def decoder_layers(model: nn.Module) -> str:
    """Module name of the ``ModuleList`` of decoder layers: the one of ``num_hidden_layers`` entries in the
    text model (vision towers have their own, shorter or longer, lists)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and name.rsplit(".", 1)[-1] == "layers"
        and len(module) == count
        and not any(part in name for part in ("vision", "visual", "audio"))
    ]
    if len(candidates) != 1:
        raise ModelLoadError(
            f"cannot run {type(model).__name__} layer by layer: expected one list of {count} decoder layers, "
            f"found {candidates or 'none'}; run it without --sequential"
        )
    return candidates[0]


def _model_dtype(config, first_float: torch.dtype | None) -> torch.dtype:
    """What ``from_pretrained(dtype="auto")`` picks: the config's dtype, else the checkpoint's."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for candidate in (getattr(config, "dtype", None), getattr(text, "dtype", None)):
        if isinstance(candidate, torch.dtype):
            return candidate
        if isinstance(candidate, str) and candidate != "auto":
            return getattr(torch, candidate)
    return first_float or torch.float32


def _generation_config(directory: Path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(directory)
    except OSError:
        return GenerationConfig.from_pretrained(directory, config_file_name="config.json", _from_model_config=True)


def build_skeleton(directory: Path, first_float: torch.dtype | None = None) -> Skeleton:
    """The model ``directory/config.json`` describes, on the meta device (its quantization_config dropped:
    the source dequantizes the weights, transformers must not)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as exc:  # noqa: BLE001  (transformers raises many kinds on a bad config)
        raise ModelLoadError(f"{directory}/config.json: transformers cannot read it: {exc!r:.300}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = _model_dtype(config, first_float)
    try:  # the class AutoModelForCausalLM.from_pretrained builds, as the whole-model path loads it
        with torch.device("meta"), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{directory}/config.json: transformers cannot build the model: {exc!r:.300}") from None
    model.name_or_path = str(directory)
    model.config._name_or_path = str(directory)
    if model.can_generate():  # as from_pretrained does: the file, else the generation fields of config.json
        try:
            model.generation_config = _generation_config(directory)
        except Exception as exc:  # noqa: BLE001  (a broken generation config does not affect the weights)
            logger.warning("%s: generation config ignored: %s", directory, exc)
    return Skeleton(model.eval(), decoder_layers(model), dtype)
