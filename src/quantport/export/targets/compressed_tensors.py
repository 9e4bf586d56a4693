"""The compressed-tensors checkpoint format (``quant_method: compressed-tensors``).

Per quantized Linear ``P`` the tensors are the scheme codec's pieces, under compressed-tensors' names and
shapes (:mod:`quantport.dialects.compressed_tensors`, whose rows the loader reads too):

==================  ===========================================================================
scheme              tensors (``P.`` prefix)
==================  ===========================================================================
fp8                 ``weight`` fp8 ``[out, in]``, ``weight_scale`` fp32 ``(1,)``, ``input_scale`` fp32 ``(1,)``
fp8-dynamic         ``weight`` fp8, ``weight_scale`` fp32 ``[out, 1]``
fp8-block           ``weight`` fp8, ``weight_scale`` fp32 ``[ceil(out/128), in/128]``
nvfp4(-ct)          ``weight_packed`` uint8 ``[out, in/2]``, ``weight_scale`` fp8 ``[out, in/16]``,
                    ``weight_global_scale`` fp32 ``(1,)`` = 2688/amax, ``input_global_scale`` (W4A4)
mxfp4               ``weight_packed`` uint8 ``[out, in/2]``, ``weight_scale`` uint8 E8M0 ``[out, in/32]``
int8                ``weight`` int8 ``[out, in]``, ``weight_scale`` (model dtype) ``[out, 1]``
w4a16 / w8a16       ``weight_packed`` int32 ``[out, in*bits/32]``, ``weight_scale`` (model dtype)
                    ``[out, in/128]``, ``weight_shape`` int64 ``[2]``, ``weight_zero_point`` (asym)
==================  ===========================================================================

An FP8 KV cache adds ``<attn>.k_scale`` / ``<attn>.v_scale`` (fp32 ``(1,)``, amax / 448) and a
``kv_cache_scheme``. ``config.json["quantization_config"]`` is built with compressed-tensors' own
``QuantizationConfig`` / ``QuantizationScheme`` / ``QuantizationArgs`` models and ``format`` is
inferred by compressed-tensors' ``infer_module_format``, so the config is what its readers parse.
compressed-tensors is imported only here, when this format is written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...arch.experts import ExpertIgnore, MoEBlock, find_moe_blocks
from ...arch.hub_names import HubNames
from ...dialects import ExportFormat
from ...dialects.compressed_tensors import CT_SCHEMES, KV_CACHE_ARGS, CtScheme, ct_shape
from ...errors import ExportError
from ...formats.pieces import Piece
from ...modules.kv_cache import kv_quantizer_of
from ...modules.quant_experts import experts_quantizer_of
from ...modules.quant_linear import QuantLinear
from ...recipes import KVCacheFormat, LinearScheme
from ...schemes import TensorSpec
from ...state import QuantizationState
from ..content import CheckpointContent
from ..shards import OneSlotCache, PlannedTensor
from ..unquantized import excluded_modules
from .base import Target
from .ct_experts import ct_expert_plan
from .walk import model_plan

__all__ = [
    "SCHEMES",
    "TARGET",
    "compressed_tensors_content",
    "ct_ignore",
    "ct_quantization_config",
    "ct_scheme",
    "ct_tensor_plan",
]

CONFIG_TARGETS = ["Linear"]
"""Config-group targets: vLLM matches Linear layers (and MoE experts) by this class name."""


def _compressed_tensors() -> Any:
    try:
        import compressed_tensors
    except ImportError as exc:  # pragma: no cover  (the dev environment has it)
        raise ExportError(
            "writing the compressed-tensors format needs the compressed-tensors package: pip install compressed-tensors"
        ) from exc
    return compressed_tensors


def ct_scheme(scheme: LinearScheme) -> Any:
    """compressed-tensors' ``QuantizationScheme`` of ``scheme``, with its inferred ``format`` set."""
    _compressed_tensors()
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    row = CT_SCHEMES[scheme]
    inputs = None if row.input_activations is None else QuantizationArgs(**row.input_activations)
    weights = QuantizationArgs(**row.weights)
    result = QuantizationScheme(targets=list(CONFIG_TARGETS), weights=weights, input_activations=inputs)
    inferred = infer_module_format(nn.Linear, result)
    assert inferred.value == row.format, (
        f"compressed-tensors infers {inferred.value} for {scheme.value}, expected {row.format}"
    )
    result.format = inferred
    return result


def _unquantized_experts_entries(names: HubNames, block: MoEBlock) -> list[str]:
    """Ignore entries, beside the module's own name, for an experts module left unquantized."""
    experts = names.module(block.experts_name)
    if block.layout.ct_ignore is ExpertIgnore.PATTERN:
        return [f"re:{re.escape(experts)}\\..*"]
    names.prefetch(
        f"{block.experts_name}.{e}.{leaf}" for e in range(block.num_experts) for leaf in block.layout.leaf_names
    )
    return [
        names.module(f"{block.experts_name}.{e}.{leaf}")
        for e in range(block.num_experts)
        for leaf in block.layout.leaf_names
    ]


def ct_ignore(model: nn.Module) -> list[str]:
    """The ``ignore`` list: every module with a weight matrix and no scales, by checkpoint name.

    An unquantized experts module is listed by its own name and as its family's layout says vLLM looks it up
    (:class:`~quantport.arch.experts.ExpertIgnore`): by its per-expert projections
    (``<experts>.{e}.<gate|up|down leaf>``; vLLM 0.32's ``CompressedTensorsMoEMethod`` looks up
    ``<experts>.0.<gate leaf>`` etc., not the experts module's name), or, for families whose vLLM name mapper
    rewrites those names (GPT-OSS), by one ``re:`` pattern over the module.
    """
    names = HubNames(model)
    ignore = set(excluded_modules(model))
    for block in find_moe_blocks(model):
        if experts_quantizer_of(block.experts) is None:
            ignore.update(_unquantized_experts_entries(names, block))
    return sorted(ignore)


def ct_quantization_config(state: QuantizationState, exclude: list[str]) -> dict[str, Any]:
    """``config.json["quantization_config"]``, as compressed-tensors' ``ModelCompressor`` writes it."""
    ct = _compressed_tensors()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationStatus

    scheme = ct_scheme(state.recipe.scheme)
    kv_fp8 = state.recipe.kv_cache is KVCacheFormat.FP8 and bool(state.kv_modules)
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=scheme.format.value,
        ignore=list(exclude),
        kv_cache_scheme=QuantizationArgs(**KV_CACHE_ARGS) if kv_fp8 else None,
        quantization_status=QuantizationStatus.COMPRESSED,
    )
    return {
        "version": ct.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **config.model_dump(exclude={"quant_method"}),
    }


def _linear_entries(prefix: str, module: QuantLinear, row: CtScheme, cache: OneSlotCache) -> list[PlannedTensor]:
    def pieces() -> Mapping[Piece, torch.Tensor]:
        return cache.get(module, module.quantized_tensors)

    specs = module.codec.weight_specs(module.out_features, module.in_features, module.weight.dtype)
    if module.codec.static_input_scale:
        specs[Piece.INPUT_SCALE] = TensorSpec(torch.float32, ())
    entries = []
    for piece, spec in specs.items():
        shape = ct_shape(piece, spec.shape, module.out_features)
        entries.append(
            PlannedTensor(
                f"{prefix}.{row.suffix(piece)}",
                TensorSpec(spec.dtype, shape),
                lambda piece=piece, shape=shape: pieces()[piece].reshape(shape),
            )
        )
    return entries


def _kv_entries(prefix: str, module: nn.Module) -> list[PlannedTensor]:
    quantizer = kv_quantizer_of(module)
    if quantizer is None:
        return []
    spec = TensorSpec(torch.float32, (1,))
    return [
        PlannedTensor(f"{prefix}.k_scale", spec, lambda: quantizer.scales()[0].reshape(1)),
        PlannedTensor(f"{prefix}.v_scale", spec, lambda: quantizer.scales()[1].reshape(1)),
    ]


def ct_tensor_plan(model: nn.Module, state: QuantizationState) -> list[PlannedTensor]:
    """Every tensor of the checkpoint under its checkpoint name, computed lazily; the model is only read."""
    row = CT_SCHEMES[state.recipe.scheme]
    names = HubNames(model)
    cache = OneSlotCache()
    return model_plan(
        model,
        names,
        cache,
        linear=lambda prefix, module: _linear_entries(prefix, module, row, cache),
        kv=_kv_entries,
        experts=lambda quantizer: ct_expert_plan(quantizer, names, row, cache),
    )


def compressed_tensors_content(model: nn.Module, state: QuantizationState) -> CheckpointContent:
    """The tensors and ``config.json``'s ``quantization_config``."""
    return CheckpointContent(ct_tensor_plan(model, state), ct_quantization_config(state, ct_ignore(model)))


SCHEMES: frozenset[LinearScheme] = frozenset(CT_SCHEMES)
"""The schemes this dialect stores."""

TARGET = Target(ExportFormat.COMPRESSED_TENSORS, 1, SCHEMES, compressed_tensors_content)
"""This dialect, for :data:`quantport.export.targets.TARGETS`."""
