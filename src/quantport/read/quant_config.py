"""The quantization config of a checkpoint, normalised the way the engines read it.

vLLM reads ``config.json["quantization_config"]`` (or ``text_config.quantization_config``), and only
when that is absent the legacy nested ``hf_quant_config.json`` (engine-contract.md §1.1-§1.2).
:func:`parse_quant_config` returns one :class:`QuantConfig` view of whichever applies. Parsing is
tolerant of wrong types (the checker's config rules judge the values; the loader refuses what it
cannot decode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from typing import Any

from ..dialects import ExportFormat, declared

__all__ = [
    "CONFIG_FILE",
    "HF_QUANT_CONFIG_FILE",
    "CTGroup",
    "Dialect",
    "DialectReader",
    "QuantConfig",
    "config_quant_block",
    "declared_reader_of",
    "parse_quant_config",
]

CONFIG_FILE = "config.json"
HF_QUANT_CONFIG_FILE = "hf_quant_config.json"


class _DialectBase(str, Enum):
    """How a checkpoint names and lays out its quantized tensors, from ``quant_method``."""

    def __str__(self) -> str:
        return self.value


Dialect = _DialectBase(
    "Dialect",
    [(fmt.name, fmt.value) for fmt in ExportFormat] + [("UNKNOWN", "unknown"), ("NONE", "none")],
    module=__name__,
    qualname="Dialect",
)
"""How a checkpoint names and lays out its quantized tensors, from ``quant_method``: one member per
:class:`~quantport.dialects.ExportFormat` (each dialect quantport writes, with the same name and value),
plus ``UNKNOWN`` (a ``quant_method`` quantport does not know) and ``NONE`` (no quantization config).
Derived, so a new dialect adds no member here."""


@dataclass(frozen=True)
class CTGroup:
    """One compressed-tensors ``config_groups`` entry (``weights`` / ``input_activations`` as written)."""

    name: str
    targets: tuple[str, ...]
    weights: dict[str, Any] | None
    input_activations: dict[str, Any] | None
    format: str | None


@dataclass
class QuantConfig:
    """The normalised quantization config.

    Attributes:
        format: the checkpoint dialect.
        source: the file the config was read from.
        raw: the block as written.
        nested: True when it is ModelOpt's nested form (``{"producer", "quantization"}``).
        quant_method: ``quant_method`` as written (lower-cased), or None.
        quant_algo: ModelOpt ``quant_algo``, upper-cased.
        ignore: the exclusion list (``ignore`` / ``exclude_modules`` / ``modules_to_not_convert``).
        group_size: ``group_size`` when given.
        kv_cache: ``"FP8"`` (or another algo name) when the KV cache is quantized, else None.
        quantized_layers: MIXED_PRECISION per-layer settings.
        ct_format: compressed-tensors top-level ``format``.
        ct_groups: compressed-tensors ``config_groups``.
    """

    format: Dialect
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    nested: bool = False
    quant_method: str | None = None
    quant_algo: str | None = None
    ignore: list[str] = field(default_factory=list)
    group_size: Any = None
    kv_cache: str | None = None
    quantized_layers: dict[str, Any] = field(default_factory=dict)
    ct_format: str | None = None
    ct_groups: list[CTGroup] = field(default_factory=list)

    @property
    def dialect(self) -> Dialect:
        """The checkpoint dialect (same as :attr:`format`)."""
        return self.format

    def modelopt_algo_for(self, module: str) -> str | None:
        """The ModelOpt algorithm of ``module`` (MIXED_PRECISION: its ``quantized_layers`` entry)."""
        if self.quant_algo != "MIXED_PRECISION":
            return self.quant_algo
        entry = self.quantized_layers.get(module)
        algo = entry.get("quant_algo") if isinstance(entry, dict) else None
        return str(algo).upper() if algo else None


@dataclass(frozen=True)
class DialectReader:
    """How the reader understands a dialect that declares itself in its own module
    (``READER = DialectReader(...)`` in ``quantport/dialects/<dialect>.py``, found by discovery).

    Attributes:
        dialect: the :class:`Dialect` value (its :class:`~quantport.dialects.ExportFormat` value).
        quant_method: the ``quant_method`` it is written with (lower case).
        fields: :class:`QuantConfig` fields read from the config block (``ignore``, ``kv_cache``...).
        scheme: the scheme of one quantized module: (config, module prefix, ``ModuleRole`` value) -> scheme
            name, or None when the config assigns it nothing.
    """

    dialect: str
    quant_method: str
    fields: Callable[[dict[str, Any]], dict[str, Any]]
    scheme: Callable[[QuantConfig, str, str], str | None]


@cache
def _declared_readers() -> dict[str, DialectReader]:
    return {reader.quant_method: reader for reader in declared("READER")}


def _declared_reader(method: str) -> DialectReader | None:
    return _declared_readers().get(method)


def declared_reader_of(dialect: Dialect) -> DialectReader | None:
    """The declared reader of ``dialect``, or None for the dialects this module reads itself."""
    if dialect in (Dialect.MODELOPT, Dialect.COMPRESSED_TENSORS, Dialect.MXFP4, Dialect.UNKNOWN, Dialect.NONE):
        return None
    return next((r for r in _declared_readers().values() if r.dialect == dialect.value), None)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _string_list(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _kv_from_scheme(scheme: Any) -> str | None:
    if isinstance(scheme, dict) and scheme.get("type") == "float" and scheme.get("num_bits") == 8:
        return "FP8"
    return scheme.upper() if isinstance(scheme, str) else None


def _from_nested(block: dict[str, Any], source: str) -> QuantConfig:
    quant = block.get("quantization") if isinstance(block.get("quantization"), dict) else {}
    algo = quant.get("quant_algo")
    kv = quant.get("kv_cache_quant_algo")
    return QuantConfig(
        format=Dialect.MODELOPT,
        source=source,
        raw=block,
        nested=True,
        quant_method="modelopt",
        quant_algo=str(algo).upper() if isinstance(algo, str) else None,
        ignore=_string_list(quant.get("exclude_modules")),
        group_size=quant.get("group_size"),
        kv_cache=str(kv).upper() if isinstance(kv, str) else None,
        quantized_layers=_dict(quant.get("quantized_layers")),
    )


def _ct_groups(block: dict[str, Any]) -> list[CTGroup]:
    groups = block.get("config_groups")
    if not isinstance(groups, dict):
        return []
    out = []
    for name, group in groups.items():
        if isinstance(group, dict):
            targets = tuple(_string_list(group.get("targets")))
            weights = group.get("weights") if isinstance(group.get("weights"), dict) else None
            acts = group.get("input_activations") if isinstance(group.get("input_activations"), dict) else None
            fmt = group.get("format") if isinstance(group.get("format"), str) else None
            top = block.get("format") if isinstance(block.get("format"), str) else None
            out.append(CTGroup(str(name), targets, weights, acts, fmt or top))
    return out


def _modelopt_kv(block: dict[str, Any]) -> str | None:
    if isinstance(block.get("kv_cache_quant_algo"), str):
        return block["kv_cache_quant_algo"].upper()
    return _kv_from_scheme(block.get("kv_cache_scheme"))


def _from_flat(block: dict[str, Any], source: str) -> QuantConfig:
    method = block.get("quant_method")
    method = method.lower().replace("compressed_tensors", "compressed-tensors") if isinstance(method, str) else None
    if method and method.startswith("modelopt"):
        algo = block.get("quant_algo")
        ignore = block.get("ignore") if "ignore" in block else block.get("exclude_modules")
        return QuantConfig(
            format=Dialect.MODELOPT,
            source=source,
            raw=block,
            quant_method=method,
            quant_algo=str(algo).upper() if isinstance(algo, str) else None,
            ignore=_string_list(ignore),
            group_size=block.get("group_size"),
            kv_cache=_modelopt_kv(block),
            quantized_layers=_dict(block.get("quantized_layers")),
        )
    if method == "compressed-tensors":
        return QuantConfig(
            format=Dialect.COMPRESSED_TENSORS,
            source=source,
            raw=block,
            quant_method=method,
            ignore=_string_list(block.get("ignore")),
            kv_cache=_kv_from_scheme(block.get("kv_cache_scheme")),
            ct_format=block.get("format") if isinstance(block.get("format"), str) else None,
            ct_groups=_ct_groups(block),
        )
    if method == "mxfp4":
        return QuantConfig(
            format=Dialect.MXFP4,
            source=source,
            raw=block,
            quant_method=method,
            ignore=_string_list(block.get("modules_to_not_convert")),
        )
    reader = _declared_reader(method) if method else None
    if reader is not None:
        return QuantConfig(
            format=Dialect(reader.dialect), source=source, raw=block, quant_method=method, **reader.fields(block)
        )
    return QuantConfig(format=Dialect.UNKNOWN, source=source, raw=block, quant_method=method)


def config_quant_block(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The quantization block of config.json, where vLLM looks for it."""
    if not config:
        return None
    for holder in (config, config.get("text_config") or {}):
        block = holder.get("quantization_config") if isinstance(holder, dict) else None
        if isinstance(block, dict):
            return block
    block = config.get("compression_config")
    return block if isinstance(block, dict) else None


def parse_quant_config(config: dict[str, Any] | None, hf_quant_config: dict[str, Any] | None) -> QuantConfig:
    """The config an engine would use: config.json's block, else ``hf_quant_config.json``'s.

    An empty ``quantization_config`` object is :attr:`Dialect.UNKNOWN` with an empty :attr:`QuantConfig.raw`.
    """
    block = config_quant_block(config)
    if block is not None:
        if isinstance(block.get("quantization"), dict):
            return _from_nested(block, CONFIG_FILE)
        return _from_flat(block, CONFIG_FILE)
    if hf_quant_config is not None:
        return _from_nested(hf_quant_config, HF_QUANT_CONFIG_FILE)
    return QuantConfig(format=Dialect.NONE)
