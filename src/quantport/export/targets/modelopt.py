"""The NVIDIA ModelOpt "unified HF checkpoint" format: tensor plan and config blocks.

Layout per quantized Linear ``P`` (engine-contract.md §2): the codec's pieces under ModelOpt's names
(:mod:`quantport.dialects.modelopt`, which also holds the ``quant_algo`` table the loader reads):
``P.weight`` (codes), ``P.weight_scale``, ``P.weight_scale_2`` (NVFP4), ``P.input_scale`` (static activations).
KV-cache scales: ``<attn>.k_proj.k_scale`` and ``<attn>.v_proj.v_scale`` (amax / 448). Every other
tensor is written as the model holds it. The config is written twice, as ModelOpt does: flat in
``config.json["quantization_config"]`` (what vLLM reads) and nested in ``hf_quant_config.json``
(what TensorRT-LLM and older readers read).

``producer.name`` is ``"modelopt"`` because that is how engines recognise this format's dialect;
quantport identifies itself in ``quantport_report.json``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...arch.hub_names import HubNames
from ...dialects import ExportFormat
from ...dialects.modelopt import FP8_ARGS, MODELOPT_ALGOS, ModeloptAlgo, fused_name, linear_suffix, quant_algo
from ...formats.pieces import Piece
from ...modules.kv_cache import kv_quantizer_of
from ...modules.quant_linear import QuantLinear
from ...recipes import KVCacheFormat, LinearScheme
from ...schemes import SchemeCodec, TensorSpec, codec_for
from ...state import QuantizationState
from ..content import CheckpointContent
from ..experts import expert_plan, replaced_parameters
from ..shards import OneSlotCache, PlannedTensor
from ..unquantized import excluded_modules
from .base import Target, UnsupportedFormatError
from .walk import model_plan

__all__ = [
    "MODELOPT_ALGOS",
    "MODELOPT_FORMAT_VERSION",
    "MOE_SCHEMES",
    "SCHEMES",
    "TARGET",
    "ModeloptAlgo",
    "quant_algo",
    "excluded_modules",
    "fused_name",
    "linear_suffix",
    "modelopt_configs",
    "modelopt_tensor_plan",
    "modelopt_content",
]

MODELOPT_FORMAT_VERSION = "0.47.0"
"""The nvidia-modelopt release whose unified checkpoint this exporter writes (and is tested against)."""

_PRODUCER = {"name": "modelopt", "version": MODELOPT_FORMAT_VERSION}


def _linear_entries(prefix: str, module: QuantLinear, cache: OneSlotCache) -> list[PlannedTensor]:
    codec: SchemeCodec = module.codec
    specs = codec.weight_specs(module.out_features, module.in_features)
    if codec.static_input_scale:
        specs[Piece.INPUT_SCALE] = TensorSpec(torch.float32, ())
    return [
        PlannedTensor(
            f"{prefix}.{linear_suffix(piece)}", spec, lambda p=piece: cache.get(module, module.quantized_tensors)[p]
        )
        for piece, spec in specs.items()
    ]


def _kv_entries(prefix: str, module: nn.Module) -> list[PlannedTensor]:
    quantizer = kv_quantizer_of(module)
    if quantizer is None:
        return []
    spec = TensorSpec(torch.float32, ())
    return [
        PlannedTensor(f"{prefix}.k_proj.k_scale", spec, lambda: quantizer.scales()[0].reshape(())),
        PlannedTensor(f"{prefix}.v_proj.v_scale", spec, lambda: quantizer.scales()[1].reshape(())),
    ]


def modelopt_tensor_plan(model: nn.Module) -> list[PlannedTensor]:
    """Every tensor of the checkpoint under its checkpoint name, computed lazily; the model is only read."""
    names = HubNames(model)
    cache = OneSlotCache()
    return model_plan(
        model,
        names,
        cache,
        linear=lambda prefix, module: _linear_entries(prefix, module, cache),
        kv=_kv_entries,
        experts=lambda quantizer: (expert_plan(quantizer, names, cache), replaced_parameters(quantizer)),
    )


def _config_groups(scheme: LinearScheme) -> dict[str, Any] | None:
    group = MODELOPT_ALGOS[scheme].config_group
    if group is None:
        return None
    return {"group_0": {**{key: dict(args) for key, args in group.items()}, "targets": ["Linear"]}}


def modelopt_configs(
    codec: SchemeCodec, state: QuantizationState, exclude: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``config.json["quantization_config"]``, ``hf_quant_config.json``) for this checkpoint."""
    kv_fp8 = state.recipe.kv_cache is KVCacheFormat.FP8 and bool(state.kv_modules)
    algo = quant_algo(codec.scheme)
    nested: dict[str, Any] = {"quant_algo": algo, "kv_cache_quant_algo": "FP8" if kv_fp8 else None}
    if codec.group_size is not None:
        nested["group_size"] = codec.group_size
    nested["exclude_modules"] = list(exclude)
    flat: dict[str, Any] = {}
    groups = _config_groups(codec.scheme)
    if groups is not None:
        flat["config_groups"] = groups
    flat["ignore"] = list(exclude)
    flat["quant_algo"] = algo
    if codec.group_size is not None:
        flat["group_size"] = codec.group_size
    if kv_fp8:
        flat["kv_cache_scheme"] = dict(FP8_ARGS)
    flat["producer"] = dict(_PRODUCER)
    flat["quant_method"] = "modelopt"
    return flat, {"producer": dict(_PRODUCER), "quantization": nested}


MOE_SCHEMES = frozenset({LinearScheme.FP8, LinearScheme.NVFP4, LinearScheme.W4A16_NVFP4, LinearScheme.MXFP8})
"""Schemes vLLM's ModelOpt MoE methods read for experts: per-tensor FP8, NVFP4 and MXFP8 (engine-contract
§3.1: FP8_PER_CHANNEL_PER_TOKEN and FP8_PB_WO experts would be loaded by the per-tensor FP8 method)."""


def check_modelopt_experts(state: QuantizationState) -> None:
    """A clear error when quantized experts have no form an engine reads in the ModelOpt format."""
    if state.experts and state.recipe.scheme not in MOE_SCHEMES:
        raise UnsupportedFormatError(
            f"the ModelOpt format has no {state.recipe.scheme.value} form for MoE experts that vLLM or SGLang "
            f"load ({len(state.experts)} experts modules are quantized); export with --format compressed-tensors, "
            "use fp8 / nvfp4 / mxfp8, or keep the experts in bf16 with --exclude '*.experts'"
        )


def modelopt_content(model: nn.Module, state: QuantizationState) -> CheckpointContent:
    """The tensors, ``config.json``'s ``quantization_config`` and ``hf_quant_config.json``."""
    check_modelopt_experts(state)
    exclude = excluded_modules(model)
    flat, nested = modelopt_configs(codec_for(state.recipe.scheme), state, exclude)
    return CheckpointContent(modelopt_tensor_plan(model), flat, {"hf_quant_config.json": nested})


SCHEMES: frozenset[LinearScheme] = frozenset(MODELOPT_ALGOS)
"""The schemes this dialect stores."""

TARGET = Target(ExportFormat.MODELOPT, 0, SCHEMES, modelopt_content)
"""This dialect, for :data:`quantport.export.targets.TARGETS`."""
