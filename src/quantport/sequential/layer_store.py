"""Decoder layers given their tensors one at a time, from a weight source, through transformers' own loading.

A checkpoint's tensors reach a model through transformers' conversion mapping (renamed keys, per-expert
weights fused into 3-D parameters, ``keep_in_fp32`` modules): :class:`LayerStore` runs exactly that code,
``convert_and_load_state_dict_in_model``, on one layer's checkpoint tensors at a time, so a layer holds the
same values as in a model ``from_pretrained`` loaded whole. The one exception is the fused experts of a MoE
layer: transformers would stack every expert's tensors into them while the per-expert tensors are alive (twice
the layer); :mod:`.expert_fill` allocates them once and fills them expert by expert, to the same bytes, so a
layer loads in its own size plus one tensor's temporaries. Freeing a layer puts its tensors back on the
meta device; modules keep their identity, so quantization records attached to them survive.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from ..arch.hub_names import HubNames
from ..errors import MissingWeightsError
from ..loading import quiet_transformers_loading
from ..sources.base import RowSource, WeightSource
from .expert_fill import expert_layouts, fill_experts, plan_expert_reads
from .skeleton import Skeleton

__all__ = ["LayerStore"]

logger = logging.getLogger(__name__)


def _with_buffers_ready(module: nn.Module, model: nn.Module, device: torch.device) -> None:
    """Give ``module``'s own buffers real memory and their built values (e.g. rotary ``inv_freq``: not in
    the checkpoint, computed by the model's ``_init_weights``)."""
    if not any(b is not None and b.is_meta for b in module._buffers.values()):
        return
    for name, buffer in list(module._buffers.items()):
        if buffer is not None and buffer.is_meta:
            module._buffers[name] = torch.empty_like(buffer, device=device)
    model._init_weights(module)


class LayerStore:
    """The skeleton's tensors from ``source``: the resident part once, decoder layers on demand.

    Thread-safe: :meth:`load` and :meth:`free` may be called from the export's shard threads.
    """

    def __init__(
        self, skeleton: Skeleton, source: WeightSource, device: torch.device | str, *, activations_on_host: bool = False
    ) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.modeling_utils import LoadStateDictConfig

        self.skeleton = skeleton
        self.source = source
        self.device = torch.device(device)
        self.activations_on_host = activations_on_host
        model = skeleton.model
        self._config = LoadStateDictConfig(
            device_map={"": self.device},
            dtype=skeleton.dtype,
            dtype_plan=model._get_dtype_plan(skeleton.dtype),
            weight_mapping=get_model_conversion_mapping(model, None, None),
        )
        names = HubNames(model)
        names.prefetch(skeleton.layer_name(i) for i in range(len(skeleton.layers)))
        self._stems = {
            names.module(skeleton.layer_name(i)).rpartition(".")[0] + "." for i in range(len(skeleton.layers))
        }
        self._keys = self._keys_by_layer()
        self._expert_layouts = expert_layouts(model)
        self._lock = threading.Lock()
        self.loaded: set[int] = set()

    def layer_of(self, checkpoint_name: str) -> int | None:
        """The decoder layer a checkpoint tensor name belongs to (None: outside the layers). Numbers past the
        model's layers (e.g. DeepSeek's multi-token-prediction layer) are returned too."""
        stem = next((s for s in self._stems if checkpoint_name.startswith(s)), None)
        number = checkpoint_name[len(stem) :].split(".", 1)[0] if stem else ""
        return int(number) if number.isdigit() else None

    def checkpoint_names(self, index: int | None) -> list[str]:
        """The checkpoint (source) names read for decoder layer ``index`` (None: the resident rest)."""
        return list(self._keys.get(index, []))

    def _keys_by_layer(self) -> dict[int | None, list[str]]:
        """Checkpoint names per decoder layer (None: the resident rest), by the model key transformers' loading
        renames each to (e.g. ``language_model.model.layers.3.*`` is ``model.layers.3.*`` in a text-only model)."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        model = self.skeleton.model
        mapping = self._config.weight_mapping or []
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        meta = model.state_dict()
        stem = self.skeleton.layers_name + "."
        keys: dict[int | None, list[str]] = defaultdict(list)
        for name in self.source.tensors():
            renamed, _ = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
            if renamed not in meta:  # e.g. a vision tower the text-only model does not have
                continue
            number = renamed[len(stem) :].split(".", 1)[0] if renamed.startswith(stem) else ""
            layer = int(number) if number.isdigit() else None
            if layer is not None and layer >= len(self.skeleton.layers):
                logger.debug("skipping %s: the model has no decoder layer %d", name, layer)
                continue
            keys[layer].append(name)
        return keys

    def _read_into(self, module_prefix: str, keys: Iterable[str]) -> None:
        """Read ``keys`` into the model; every parameter under ``module_prefix`` must have been given."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model

        model = self.skeleton.model
        mapping = self._config.weight_mapping or []
        rows = isinstance(self.source, RowSource)
        reads = plan_expert_reads(keys, model, mapping, self._expert_layouts, rows=rows)
        filled = fill_experts(reads, model, self.source, self.device, self._dtype_of)
        state = self.source.read(reads.rest, self.device)
        with quiet_transformers_loading(progress=False):
            info, _ = convert_and_load_state_dict_in_model(model, state, self._config)
        del state
        expected = {k for k, _ in model.named_parameters() if module_prefix and k.startswith(module_prefix)} - filled
        missing = sorted(k for k in info.missing_keys if k in expected)
        if missing or info.mismatched_keys:
            shown = ", ".join(missing[:5]) or ", ".join(f"{k} {a}!={b}" for k, a, b in list(info.mismatched_keys)[:5])
            raise MissingWeightsError(
                f"the checkpoint does not give {module_prefix or 'the model'} all its weights ({shown}); "
                "it does not belong to this config"
            )

    def _dtype_of(self, parameter: str) -> torch.dtype:
        """The dtype transformers' loading gives ``parameter``: its dtype plan's (e.g. ``keep_in_fp32``) where one
        matches, else the skeleton's parameter dtype."""
        from transformers.core_model_loading import build_glob_alternation

        plan = self._config.dtype_plan or {}
        if plan:
            alternation, by_group, _ = build_glob_alternation(list(plan))
            match = alternation.search(parameter)
            if match is not None:
                return plan[by_group[match.lastgroup]]
        return self.skeleton.model.get_parameter(parameter).dtype

    def load_resident(self) -> None:
        """Everything outside the decoder layers: embeddings, final norm, output head, rotary embedding."""
        model = self.skeleton.model
        layers = self.skeleton.layers
        inside = {id(m) for m in layers.modules()}
        for module in model.modules():
            if id(module) not in inside:
                _with_buffers_ready(module, model, self.device)
        self._read_into("", self._keys.get(None, []))
        model.tie_weights()
        outside = [
            n for n, p in model.named_parameters() if p.is_meta and not n.startswith(self.skeleton.layers_name + ".")
        ]
        if outside:
            raise MissingWeightsError(f"the checkpoint lacks {len(outside)} parameter(s): {', '.join(outside[:5])}")

    def load(self, index: int) -> nn.Module:
        """Decoder layer ``index`` with its tensors on the device (a no-op when it has them)."""
        with self._lock:
            layer = self.skeleton.layers[index]
            if index in self.loaded:
                return layer
            for module in layer.modules():
                _with_buffers_ready(module, self.skeleton.model, self.device)
            self._read_into(self.skeleton.layer_name(index) + ".", self._keys.get(index, []))
            self.loaded.add(index)
            return layer

    def free(self, index: int) -> None:
        """Decoder layer ``index`` back on the meta device (its modules and attached records stay)."""
        with self._lock:
            if index not in self.loaded:
                return
            for module in self.skeleton.layers[index].modules():
                for name, tensor in module._parameters.items():
                    if tensor is not None:
                        module._parameters[name] = nn.Parameter(tensor.to("meta"), requires_grad=False)
                for name, tensor in module._buffers.items():
                    if tensor is not None:
                        module._buffers[name] = tensor.to("meta")
            self.loaded.discard(index)
