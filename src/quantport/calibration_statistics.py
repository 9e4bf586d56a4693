"""What calibration found, as data: saved to a file, applied to a model to export it in any format.

A quantized model's statistics are the fp32 amax values its quantizers hold (per Linear: weight, input,
the group-shared weight amax; per experts module: tokens per expert, observed and policy-filled input
amax, weight amax per expert; per attention module: key and value amax) and the record of the run
(:class:`~quantport.state.QuantizationState`). They do not depend on the checkpoint format: NVFP4's global
scale is amax/2688 in ModelOpt and its reciprocal in compressed-tensors, both computed at export from the
same amax. So one calibration exports to every format (:func:`apply_statistics` with another ``format``).

The file is safetensors: one fp32/int64 tensor per statistic, the run record as JSON under the metadata
key ``quantport_statistics``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .algorithm_options import Algorithm
from .arch.experts import find_moe_blocks
from .arch.fused_groups import find_attention_modules, find_shared_input_groups
from .errors import InvalidArgumentError, OutputWriteError
from .modules.kv_cache import install_kv_quantizer, kv_quantizer_of
from .modules.quant_experts import PROJECTIONS, experts_quantizer_of, install_experts_quantizer
from .modules.quant_linear import QuantLinear
from .recipes import KVCacheFormat, get_recipe
from .report.coverage import ExpertCoverage, LayerCoverage
from .schemes import codec_for
from .sequential.attached import layer_store_of
from .state import QuantizationState, attach_state, state_of

__all__ = ["CalibrationStatistics", "apply_statistics", "collect_statistics", "load_statistics", "save_statistics"]

METADATA_KEY = "quantport_statistics"
VERSION = 1


@dataclass
class CalibrationStatistics:
    """A calibration's statistics (``tensors``, by ``kind/module/name``) and its run record (``record``)."""

    tensors: dict[str, torch.Tensor]
    record: dict[str, Any]


def _put(tensors: dict[str, torch.Tensor], key: str, value: torch.Tensor | None) -> None:
    if value is not None:
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()  # own storage: groups share one tensor


def collect_statistics(model: nn.Module) -> CalibrationStatistics:
    """The statistics of a model :func:`quantport.quantize` calibrated (``--algorithm max``: the others change
    weights, which statistics do not hold)."""
    state = state_of(model)
    if state.algorithm != Algorithm.MAX.value:
        raise InvalidArgumentError(
            f"--algorithm {state.algorithm} changes weights, which saved statistics do not hold; save statistics "
            "of --algorithm max runs only"
        )
    tensors: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for name in state.quantized:
        module = modules[name]
        _put(tensors, f"linear/{name}/weight_amax", module._own_weight_amax)
        _put(tensors, f"linear/{name}/input_amax", module.input_amax)
        _put(tensors, f"linear/{name}/shared_weight_amax", module.shared_weight_amax)
    for name in state.experts:
        quantizer = experts_quantizer_of(modules[name])
        _put(tensors, f"experts/{name}/tokens", quantizer.tokens)
        for projection in PROJECTIONS:
            _put(tensors, f"experts/{name}/weight_amax/{projection}", quantizer.weight_amax[projection])
            _put(tensors, f"experts/{name}/input_amax/{projection}", quantizer.input_amax[projection])
            if quantizer.export_input_amax is not None:
                _put(tensors, f"experts/{name}/export_input_amax/{projection}", quantizer.export_input_amax[projection])
    for name in state.kv_modules:
        quantizer = kv_quantizer_of(modules[name])
        _put(tensors, f"kv/{name}/k_amax", quantizer.k_amax)
        _put(tensors, f"kv/{name}/v_amax", quantizer.v_amax)
    record = {
        "version": VERSION,
        "recipe": state.recipe.name,
        "kv_cache": state.recipe.kv_cache.value,
        "exclude": list(state.recipe.exclude),
        "quantized": state.quantized,
        "excluded": state.excluded,
        "groups": [g.fused_name for g in state.groups],
        "kv_modules": state.kv_modules,
        "experts": state.experts,
        "calibration_tokens": state.calibration_tokens,
        "coverage": None if state.coverage is None else [state.coverage.input_scales, state.coverage.calibration],
        "left_at_rtn": state.left_at_rtn,
        "model_type": getattr(model.config, "model_type", None),
    }
    return CalibrationStatistics(tensors, record)


def save_statistics(model: nn.Module, path: str | Path) -> Path:
    """Write the model's statistics to ``path`` (safetensors); returns the path."""
    from safetensors.torch import save_file

    statistics = collect_statistics(model)
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(
            statistics.tensors, str(partial), metadata={METADATA_KEY: json.dumps(statistics.record, sort_keys=True)}
        )
        os.replace(partial, path)  # a file at PATH is a whole one
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OutputWriteError(f"cannot write statistics to {path}: {exc.strerror or exc}") from None
    return path


def load_statistics(path: str | Path) -> CalibrationStatistics:
    """Statistics saved by :func:`save_statistics`; a clear error for any other file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118  (safe_open API)
        record = json.loads(metadata[METADATA_KEY])
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        raise InvalidArgumentError(
            f"{path} is not a quantport statistics file ({type(exc).__name__}); write one with "
            "quantport quantize --save-statistics PATH"
        ) from None
    if record.get("version") != VERSION:
        raise InvalidArgumentError(f"{path}: statistics version {record.get('version')} is not {VERSION}")
    return CalibrationStatistics(tensors, record)


def _recipe(record: dict[str, Any], fmt: str | None):
    from .export.targets import recipe_for_format

    recipe = replace(get_recipe(record["recipe"]), exclude=tuple(record["exclude"]))
    return recipe_for_format(recipe, fmt).with_options(kv_cache=KVCacheFormat(record["kv_cache"]))


def _device(model: nn.Module) -> torch.device:
    """Where the statistics go: the device a layer-by-layer model computes on, else the model's."""
    store = layer_store_of(model)
    return store.device if store is not None else next(model.parameters()).device


def apply_statistics(
    model: nn.Module,
    statistics: CalibrationStatistics | str | Path,
    format: str | None = None,  # noqa: A002  (the name export() uses)
) -> nn.Module:
    """Quantize ``model`` (whole, or opened layer by layer) with saved ``statistics``, for ``format``'s numerics;
    no calibration forward runs. The model must be the one calibrated (same config and weights)."""
    stats = statistics if isinstance(statistics, CalibrationStatistics) else load_statistics(statistics)
    record, tensors = stats.record, stats.tensors
    if record["model_type"] != getattr(model.config, "model_type", None):
        raise InvalidArgumentError(
            f"the statistics are of a {record['model_type']} model, not {getattr(model.config, 'model_type', None)}"
        )
    recipe = _recipe(record, format)
    codec = codec_for(recipe.scheme)
    device = _device(model)

    def _on(value: torch.Tensor, _module: nn.Module) -> torch.Tensor:
        return value.to(device)

    modules = dict(model.named_modules())
    missing = [n for n in (*record["quantized"], *record["experts"], *record["kv_modules"]) if n not in modules]
    if missing:
        raise InvalidArgumentError(f"the statistics name modules this model does not have: {', '.join(missing[:5])}")
    for name in record["quantized"]:
        module = QuantLinear.convert(modules[name], codec, _on(tensors[f"linear/{name}/weight_amax"], modules[name]))
        for attribute in ("input_amax", "shared_weight_amax"):
            value = tensors.get(f"linear/{name}/{attribute}")
            setattr(module, attribute, None if value is None else _on(value, module))
    blocks = {b.experts_name: b for b in find_moe_blocks(model)}
    coverage = None if record["coverage"] is None else ExpertCoverage(*record["coverage"])
    for name in record["experts"]:
        block = blocks[name]
        weight_amax = {p: _on(tensors[f"experts/{name}/weight_amax/{p}"], block.experts) for p in PROJECTIONS}
        quantizer = install_experts_quantizer(block, codec, weight_amax)
        quantizer.calibrator.tokens = _on(tensors[f"experts/{name}/tokens"], block.experts)
        quantizer.calibrator.input_amax = {
            p: _on(tensors[f"experts/{name}/input_amax/{p}"], block.experts) for p in PROJECTIONS
        }
        if f"experts/{name}/export_input_amax/{PROJECTIONS[0]}" in tensors:
            quantizer.export_input_amax = {
                p: _on(tensors[f"experts/{name}/export_input_amax/{p}"], block.experts) for p in PROJECTIONS
            }
        if coverage is not None:
            observed = {p: tuple(a.tolist()) for p, a in quantizer.input_amax.items()}
            coverage.layers.append(LayerCoverage(block.name, tuple(quantizer.tokens.tolist()), observed))
    attention = dict(find_attention_modules(model))
    for name in record["kv_modules"]:
        quantizer = install_kv_quantizer(attention[name])
        quantizer.k_amax = _on(tensors[f"kv/{name}/k_amax"], attention[name])
        quantizer.v_amax = _on(tensors[f"kv/{name}/v_amax"], attention[name])
    groups = [g for g in find_shared_input_groups(model) if g.fused_name in set(record["groups"])]
    state = QuantizationState(
        recipe=recipe,
        quantized=list(record["quantized"]),
        excluded=dict(record["excluded"]),
        groups=groups,
        kv_modules=list(record["kv_modules"]),
        experts=list(record["experts"]),
        calibration_tokens=record["calibration_tokens"],
        coverage=coverage,
        left_at_rtn=dict(record["left_at_rtn"]),
        path="whole-model" if layer_store_of(model) is None else "layer-by-layer",
    )
    attach_state(model, state)
    return model
