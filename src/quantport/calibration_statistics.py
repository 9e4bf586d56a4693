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

__all__ = [
    "CalibrationStatistics",
    "apply_statistics",
    "collect_statistics",
    "load_statistics",
    "quantizer_statistics",
    "restore_quantizer_statistics",
    "save_statistics",
    "saved_weight_amax",
]

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


def quantizer_statistics(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """What the quantizers attached to module ``name`` hold (a Linear's, an experts module's, an attention
    module's KV cache's), as CPU copies under ``kind/name/statistic`` keys; absent statistics are left out."""
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(module, QuantLinear):
        _put(tensors, f"linear/{name}/weight_amax", module._own_weight_amax)
        _put(tensors, f"linear/{name}/input_amax", module.input_amax)
        _put(tensors, f"linear/{name}/shared_weight_amax", module.shared_weight_amax)
    experts = experts_quantizer_of(module)
    if experts is not None:
        _put(tensors, f"experts/{name}/tokens", experts.tokens)
        for projection in PROJECTIONS:
            _put(tensors, f"experts/{name}/weight_amax/{projection}", experts.weight_amax[projection])
            _put(tensors, f"experts/{name}/input_amax/{projection}", experts.input_amax[projection])
            if experts.export_input_amax is not None:
                _put(tensors, f"experts/{name}/export_input_amax/{projection}", experts.export_input_amax[projection])
    kv = kv_quantizer_of(module)
    if kv is not None:
        _put(tensors, f"kv/{name}/k_amax", kv.k_amax)
        _put(tensors, f"kv/{name}/v_amax", kv.v_amax)
    return tensors


def saved_weight_amax(
    tensors: dict[str, torch.Tensor], linears: list[str], experts: list[str], device: torch.device | str
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(Linear -> weight amax, experts module -> projection -> [E]) from saved statistics, on ``device``: what
    attaching the quantizers takes instead of measuring the weights."""
    linear = {n: tensors[f"linear/{n}/weight_amax"].to(device) for n in linears}
    per_expert = {e: {p: tensors[f"experts/{e}/weight_amax/{p}"].to(device) for p in PROJECTIONS} for e in experts}
    return linear, per_expert


def restore_quantizer_statistics(
    name: str, module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device | str
) -> None:
    """Put the saved statistics of module ``name`` back on its attached quantizers (their weight amax was given
    when they were attached: :func:`saved_weight_amax`)."""

    def saved(key: str) -> torch.Tensor | None:
        value = tensors.get(key)
        return None if value is None else value.to(device)

    if isinstance(module, QuantLinear):
        module.input_amax = saved(f"linear/{name}/input_amax")
        module.shared_weight_amax = saved(f"linear/{name}/shared_weight_amax")
    experts = experts_quantizer_of(module)
    if experts is not None:
        experts.calibrator.tokens = saved(f"experts/{name}/tokens")
        experts.calibrator.input_amax = {p: saved(f"experts/{name}/input_amax/{p}") for p in PROJECTIONS}
        if f"experts/{name}/export_input_amax/{PROJECTIONS[0]}" in tensors:
            experts.export_input_amax = {p: saved(f"experts/{name}/export_input_amax/{p}") for p in PROJECTIONS}
    kv = kv_quantizer_of(module)
    if kv is not None:
        kv.k_amax, kv.v_amax = saved(f"kv/{name}/k_amax"), saved(f"kv/{name}/v_amax")


def collect_statistics(model: nn.Module) -> CalibrationStatistics:
    """The statistics of a model :func:`quantport.quantize` calibrated (``--algorithm max``: the others change
    weights, which statistics do not hold)."""
    state = state_of(model)
    if state.algorithm != Algorithm.MAX.value:
        raise InvalidArgumentError(
            f"--algorithm {state.algorithm} changes weights, which saved statistics do not hold; save statistics "
            "of --algorithm max runs only"
        )
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys((*state.quantized, *state.experts, *state.kv_modules)):
        tensors.update(quantizer_statistics(name, modules[name]))
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
    modules = dict(model.named_modules())
    missing = [n for n in (*record["quantized"], *record["experts"], *record["kv_modules"]) if n not in modules]
    if missing:
        raise InvalidArgumentError(f"the statistics name modules this model does not have: {', '.join(missing[:5])}")
    linear_amax, experts_amax = saved_weight_amax(tensors, record["quantized"], record["experts"], device)
    for name in record["quantized"]:
        QuantLinear.convert(modules[name], codec, linear_amax[name])
    blocks = {b.experts_name: b for b in find_moe_blocks(model)}
    for name in record["experts"]:
        install_experts_quantizer(blocks[name], codec, experts_amax[name])
    attention = dict(find_attention_modules(model))
    for name in record["kv_modules"]:
        install_kv_quantizer(attention[name])
    for name in dict.fromkeys((*record["quantized"], *record["experts"], *record["kv_modules"])):
        restore_quantizer_statistics(name, modules[name], tensors, device)
    coverage = None if record["coverage"] is None else ExpertCoverage(*record["coverage"])
    for name in record["experts"] if coverage is not None else ():
        quantizer = experts_quantizer_of(modules[name])
        observed = {p: tuple(a.tolist()) for p, a in quantizer.input_amax.items()}
        coverage.layers.append(LayerCoverage(blocks[name].name, tuple(quantizer.tokens.tolist()), observed))
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
