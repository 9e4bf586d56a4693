"""Dialect detection: which checkpoint dialect a checkpoint speaks and how each quantized module is stored.

:func:`detect_dialect` takes the parsed JSON files (``config.json``, ``hf_quant_config.json``) and the
tensor names of the safetensors headers, and returns a :class:`CheckpointDialect`: the normalised
:class:`~quantport.read.quant_config.QuantConfig` and one :class:`QuantizedModule` per checkpoint module
that carries quantization tensors, with the scheme the config assigns it (ModelOpt ``quant_algo``,
compressed-tensors config group, native MXFP4). ``quantport check``, ``quantport inspect`` and
``quantport.load`` all read a checkpoint's dialect through it. No tensor value is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .quant_config import CTGroup, Dialect, QuantConfig, declared_reader_of, parse_quant_config

__all__ = [
    "LINEAR_QUANT_LEAVES",
    "CheckpointDialect",
    "ModuleRole",
    "QuantizedModule",
    "ct_group_for",
    "ct_name_matches",
    "detect_dialect",
    "split_fused_expert_leaf",
]

LINEAR_QUANT_LEAVES: frozenset[str] = frozenset({
    "weight_scale", "weight_scale_2", "input_scale", "weight_global_scale", "input_global_scale",
    "weight_zero_point", "input_zero_point", "weight_packed", "weight_shape", "weight_g_idx",
})  # fmt: skip
"""Tensor leaves that only a quantized Linear carries (ModelOpt and compressed-tensors names)."""

FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
"""The 3-D parameters of a fused experts module."""

_FUSED_QUANT_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "blocks", "scales")
_CLASS_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*$")


class ModuleRole(StrEnum):
    """What kind of module carries the quantization tensors."""

    LINEAR = "linear"
    """A 2-D weight ``P.weight`` / ``P.weight_packed`` with its scales (also one expert's projection)."""
    FUSED_EXPERTS = "fused_experts"
    """3-D ``X.gate_up_proj`` / ``X.down_proj`` with ``_weight_scale``... (ModelOpt) or ``_blocks`` (MXFP4)."""


@dataclass(frozen=True, slots=True)
class QuantizedModule:
    """One checkpoint module stored quantized.

    Attributes:
        name: the module's checkpoint prefix (``model.layers.0.mlp.down_proj``).
        role: a Linear-like module or a fused experts module.
        scheme: what the config says it is: the ModelOpt ``quant_algo`` (upper case), the
            compressed-tensors ``format`` of its config group, or ``MXFP4``; None when the config
            assigns it nothing (a broken checkpoint).
        ct_group: the compressed-tensors config group that targets it.
    """

    name: str
    role: ModuleRole
    scheme: str | None
    ct_group: CTGroup | None = None


@dataclass(frozen=True)
class CheckpointDialect:
    """A checkpoint's dialect, config and quantized modules.

    Attributes:
        config: the normalised quantization config.
        modules: checkpoint prefix -> :class:`QuantizedModule`, for every module with quantization tensors.
    """

    config: QuantConfig
    modules: dict[str, QuantizedModule] = field(default_factory=dict)

    @property
    def dialect(self) -> Dialect:
        return self.config.format


def split_fused_expert_leaf(leaf: str) -> tuple[str, str] | None:
    """``gate_up_proj_weight_scale`` -> (``gate_up_proj``, ``weight_scale``); ``down_proj`` -> (``down_proj``, "")."""
    for param in FUSED_EXPERT_PARAMS:
        if leaf == param:
            return param, ""
        if leaf.startswith(param + "_"):
            return param, leaf[len(param) + 1 :]
    return None


def ct_name_matches(name: str, entry: str) -> bool:
    """compressed-tensors name matching: ``re:<regex>`` (``re.match``) or the exact name."""
    if entry.startswith("re:"):
        try:
            return re.match(entry[3:], name) is not None
        except re.error:
            return False
    return entry == name


def ct_group_for(groups: Iterable[CTGroup], module: str) -> CTGroup | None:
    """The config group compressed-tensors applies to ``module``: exact name, then regex, then class
    (every module with quantization tensors is a ``Linear`` to compressed-tensors' readers)."""
    groups = list(groups)
    for predicate in (
        lambda t: not t.startswith("re:") and not _CLASS_NAME.match(t) and t == module,
        lambda t: t.startswith("re:") and ct_name_matches(module, t),
        lambda t: t == "Linear",
    ):
        for group in groups:
            if any(predicate(t) for t in group.targets):
                return group
    return None


def _quantized_prefixes(tensor_names: Iterable[str]) -> dict[str, ModuleRole]:
    found: dict[str, ModuleRole] = {}
    for name in tensor_names:
        prefix, _, leaf = name.rpartition(".")
        if not prefix:
            continue
        if leaf in LINEAR_QUANT_LEAVES:
            found.setdefault(prefix, ModuleRole.LINEAR)
            continue
        split = split_fused_expert_leaf(leaf)
        if split is not None and split[1] in _FUSED_QUANT_SUFFIXES:
            found[prefix] = ModuleRole.FUSED_EXPERTS
    return found


def _modelopt_scheme(config: QuantConfig, prefix: str, role: ModuleRole) -> str | None:
    algo = config.modelopt_algo_for(prefix)
    if algo is None and role is ModuleRole.FUSED_EXPERTS:
        algo = next(filter(None, (config.modelopt_algo_for(f"{prefix}.{p}") for p in FUSED_EXPERT_PARAMS)), None)
    return algo


def _describe(config: QuantConfig, prefix: str, role: ModuleRole) -> QuantizedModule:
    if config.format is Dialect.MODELOPT:
        return QuantizedModule(prefix, role, _modelopt_scheme(config, prefix, role))
    if config.format is Dialect.COMPRESSED_TENSORS:
        group = ct_group_for(config.ct_groups, prefix)
        return QuantizedModule(prefix, role, None if group is None else group.format, group)
    if config.format is Dialect.MXFP4 and role is ModuleRole.FUSED_EXPERTS:
        return QuantizedModule(prefix, role, "MXFP4")
    reader = declared_reader_of(config.format)
    return QuantizedModule(prefix, role, None if reader is None else reader.scheme(config, prefix, role.value))


def detect_dialect(
    config: dict[str, Any] | None, hf_quant_config: dict[str, Any] | None, tensor_names: Iterable[str]
) -> CheckpointDialect:
    """The dialect of a checkpoint from its JSON files and tensor names (values are never read)."""
    quant_config = parse_quant_config(config, hf_quant_config)
    modules = {
        prefix: _describe(quant_config, prefix, role)
        for prefix, role in sorted(_quantized_prefixes(tensor_names).items())
    }
    return CheckpointDialect(quant_config, modules)
