"""``quantport inspect``: what is in a quantized checkpoint.

Reads the same files as the checker (configs, safetensors headers, ``quantport_report.json``) and
summarises them: the format and ``quant_algo``, the recipe quantport recorded, how many layers use
each format, sizes and bits per parameter, the exclusion list, the KV cache, the MoE experts and,
when quantport wrote one, the calibration coverage of the experts. Tensor values are never read.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .check.checkpoint import CONFIG_FILE, INDEX_FILE, Checkpoint, TensorInfo
from .check.findings import Engine
from .check.qconfig import QuantConfig, model_facts
from .check.structure import Context, fused_expert_param, is_quantized
from .read import model_field_problems
from .read.dialect import CheckpointDialect, detect_dialect
from .read.quant_config import Dialect

__all__ = ["CheckpointSummary", "FormatGroup", "format_summary", "inspect_checkpoint"]


@dataclass
class FormatGroup:
    """Layers that share one storage format.

    Attributes:
        format: e.g. ``NVFP4``, ``pack-quantized int4 group 128``, ``unquantized BF16``.
        layers: number of modules (per-expert modules count one each; fused experts count one).
        leaves: module leaf name -> count (``q_proj``: 2, ``experts.gate_proj``: 8, ...).
        parameters: logical weight parameters (unpacked).
        bytes: bytes of every tensor of these modules (weights and scales).
    """

    format: str
    layers: int = 0
    leaves: dict[str, int] = field(default_factory=dict)
    parameters: int = 0
    bytes: int = 0

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.bytes / self.parameters if self.parameters else 0.0


@dataclass
class CheckpointSummary:
    """What :func:`inspect_checkpoint` found. ``to_dict()`` is the ``--json`` output."""

    path: str
    format: str
    quant_method: str | None = None
    quant_algo: str | None = None
    group_size: Any = None
    producer: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    architecture: str | None = None
    model_type: str | None = None
    files: int = 0
    tensors: int = 0
    bytes: int = 0
    parameters: int = 0
    formats: list[FormatGroup] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    kv_cache: str | None = None
    kv_scales: int = 0
    moe: dict[str, Any] | None = None
    coverage: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.bytes / self.parameters if self.parameters else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bits_per_parameter"] = round(self.bits_per_parameter, 3)
        for group, raw in zip(self.formats, data["formats"], strict=True):
            raw["bits_per_parameter"] = round(group.bits_per_parameter, 3)
        return data


def _logical_params(ctx: Context, module: str, params: dict[str, TensorInfo]) -> int:
    weight = params.get("weight")
    if weight is not None and weight.ndim >= 2:
        return weight.numel * (2 if weight.dtype == "U8" else 1)
    packed = params.get("weight_packed")
    if packed is not None:
        if packed.dtype == "U8":
            return packed.numel * 2
        value = ctx.ckpt.load(f"{module}.weight_shape") if "weight_shape" in params else None
        if value is not None and value.numel() == 2:
            return int(value[0]) * int(value[1])
        return packed.numel * 8  # int4 in int32 words: the common case
    total = 0
    for name, info in params.items():
        split = fused_expert_param(name)
        if split is not None and split[1] in ("", "blocks"):
            total += info.numel * (2 if info.dtype == "U8" else 1)
    return total


def _format_label(ctx: Context, dialect: CheckpointDialect, module: str, params: dict[str, TensorInfo]) -> str:
    q = ctx.qcfg
    fused = any(fused_expert_param(p) for p in params)
    suffix = " (fused experts)" if fused else ""
    if not is_quantized(params):
        dtypes = sorted({i.dtype for n, i in params.items() if n == "weight" or fused_expert_param(n)})
        return f"unquantized {'/'.join(dtypes) or '?'}{suffix}"
    if q.format is Dialect.MODELOPT:
        return f"{ctx.modelopt_algo(module) or 'unknown algo'}{suffix}"
    if q.format is Dialect.MXFP4:
        return "mxfp4 (native GPT-OSS)"
    if q.format is Dialect.COMPRESSED_TENSORS:
        stored = dialect.modules.get(module)
        group = None if stored is None else stored.ct_group
        if group is None or group.weights is None:
            return "compressed-tensors (no matching group)"
        w = group.weights
        detail = f"{w.get('type')}{w.get('num_bits')} {w.get('strategy')}"
        if w.get("group_size"):
            detail += f" {w['group_size']}"
        activations = "" if group.input_activations is None else " + activations"
        return f"{group.format or q.ct_format} {detail}{activations}{suffix}"
    return f"quantized ({q.quant_method}){suffix}"


def _leaf(ctx: Context, module: str) -> str:
    if module in ctx.expert_of:
        return f"experts.{module.rsplit('.', 1)[-1]}"
    return module.rsplit(".", 1)[-1]


def _formats(ctx: Context, dialect: CheckpointDialect) -> list[FormatGroup]:
    groups: dict[str, FormatGroup] = {}
    for module, params in sorted(ctx.weight_modules.items()):
        label = _format_label(ctx, dialect, module, params)
        group = groups.setdefault(label, FormatGroup(label))
        group.layers += 1
        leaf = _leaf(ctx, module)
        group.leaves[leaf] = group.leaves.get(leaf, 0) + 1
        group.parameters += _logical_params(ctx, module, params)
        group.bytes += sum(i.nbytes for i in params.values())
    return sorted(groups.values(), key=lambda g: (g.format.startswith("unquantized"), -g.parameters))


def _moe(ctx: Context) -> dict[str, Any] | None:
    blocks = ctx.moe_blocks
    if not blocks:
        return None
    stored = sorted({len(b.experts) for b in blocks.values() if not b.fused})
    return {
        "layers": len(blocks),
        "experts_per_layer": ctx.facts.num_experts,
        "naming": "fused" if all(b.fused for b in blocks.values()) else "per expert",
        "stored_experts_per_layer": stored,
        "family": ctx.layout.family if ctx.layout else None,
    }


def _coverage(report: dict[str, Any] | None) -> dict[str, Any] | None:
    coverage = report.get("coverage") if isinstance(report, dict) else None
    if not isinstance(coverage, dict) or not coverage.get("layers"):
        return None  # absent, or a dense model (no MoE layer)
    out: dict[str, Any] = {k: v for k, v in coverage.items() if k in ("input_scales", "calibration", "summary")}
    layers = coverage.get("layers")
    if isinstance(layers, dict):
        counts = [n for tokens in layers.values() if isinstance(tokens, list) for n in tokens if isinstance(n, int)]
        if counts:
            out.setdefault(
                "summary",
                {
                    "experts": len(counts),
                    "experts_without_tokens": counts.count(0),
                    "min_tokens": min(counts),
                    "median_tokens": statistics.median(counts),
                    "max_tokens": max(counts),
                },
            )
        out["layers"] = len(layers)
    dead = coverage.get("experts_without_tokens")
    if isinstance(dead, dict):
        out["experts_without_tokens"] = dead
    return out


def _producer(ckpt: Checkpoint, q: QuantConfig) -> dict[str, Any] | None:
    holders = (q.raw, ckpt.hf_quant_config or {}) if q.format is Dialect.MODELOPT else (q.raw,)
    for holder in holders:
        producer = holder.get("producer") if isinstance(holder, dict) else None
        if isinstance(producer, dict):
            return producer
    version = q.raw.get("version")
    return {"name": "compressed-tensors", "version": version} if q.format is Dialect.COMPRESSED_TENSORS else None


def _recipe(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(report, dict):
        return None
    keys = (
        "recipe",
        "scheme",
        "kv_cache",
        "format",
        "quantport_version",
        "calibration_tokens",
        "quantized_layers",
        "excluded_layers",
    )
    return {k: report[k] for k in keys if k in report}


def inspect_checkpoint(path: str | Path) -> CheckpointSummary:
    """Summarise the checkpoint directory ``path`` (headers and JSON files only)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist or is not a directory")
    ckpt = Checkpoint.open(path)
    dialect = detect_dialect(ckpt.config, ckpt.hf_quant_config, ckpt.tensors)
    q = dialect.config
    facts = model_facts(ckpt.config)
    ctx = Context(ckpt, Engine.VLLM, q, facts)
    formats = _formats(ctx, dialect)
    kv_scales = sum(1 for n in ckpt.tensors if n.rsplit(".", 1)[-1] in ("k_scale", "v_scale"))
    summary = CheckpointSummary(
        path=str(path),
        format=q.format.value,
        quant_method=q.quant_method,
        quant_algo=q.quant_algo,
        group_size=q.group_size,
        producer=_producer(ckpt, q),
        recipe=_recipe(ckpt.report),
        architecture=facts.architectures[0] if facts.architectures else None,
        model_type=facts.model_type or None,
        files=len(ckpt.files),
        tensors=len(ckpt.tensors),
        bytes=sum(i.nbytes for i in ckpt.tensors.values()),
        formats=formats,
        excluded=list(q.ignore),
        kv_cache=q.kv_cache,
        kv_scales=kv_scales,
        moe=_moe(ctx),
        coverage=_coverage(ckpt.report),
    )
    in_layers = {n for m in ctx.weight_modules for n in (f"{m}.{p}" for p in ctx.weight_modules[m])}
    summary.parameters = sum(g.parameters for g in formats) + sum(
        i.numel for n, i in ckpt.tensors.items() if n not in in_layers
    )
    summary.problems = _problems(ckpt)
    ckpt.close()
    return summary


def _problems(ckpt: Checkpoint) -> list[str]:
    """What makes the summary incomplete or the checkpoint unloadable (``quantport check`` says more)."""
    problems = list(ckpt.json_errors.values())
    problems += [f"{name}: {error}" for name, error in ckpt.file_errors.items()]
    missing = sorted(set((ckpt.index or {}).values()) - set(ckpt.files))
    problems += [f"{INDEX_FILE}: names shard {file!r}, which is not a file of the directory" for file in missing]
    problems += [f"{CONFIG_FILE}: {p.describe()}" for p in model_field_problems(ckpt.config)]
    config = ckpt.config or {}
    if config.get("quantization_config") is not None and not isinstance(config.get("quantization_config"), dict):
        problems.append(f"{CONFIG_FILE}: quantization_config is not a JSON object")
    return problems


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _leaves(group: FormatGroup, limit: int = 8) -> str:
    items = sorted(group.leaves.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{leaf} x{n}" for leaf, n in items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def format_summary(s: CheckpointSummary) -> str:
    """The text form of a summary (``quantport inspect`` without ``--json``)."""
    producer = ""
    if s.producer:
        producer = f" (producer {s.producer.get('name')} {s.producer.get('version') or ''}".rstrip() + ")"
    lines = [f"quantport inspect: {s.path}", f"  format       : {s.format}{producer}"]
    if s.quant_algo:
        lines.append(f"  quant_algo   : {s.quant_algo}" + (f" (group_size {s.group_size})" if s.group_size else ""))
    if s.recipe:
        lines.append(
            "  recipe       : "
            + ", ".join(f"{k} {v}" for k, v in s.recipe.items() if k in ("recipe", "scheme", "quantport_version"))
        )
    lines.append(f"  model        : {s.architecture or '?'} ({s.model_type or '?'})")
    lines.append(f"  files        : {s.files} safetensors, {s.tensors} tensors, {_size(s.bytes)}")
    lines.append(f"  parameters   : {_count(s.parameters)}, {s.bits_per_parameter:.2f} bits per parameter overall")
    kv_scales = f" ({s.kv_scales} scales)" if s.kv_scales else ""
    lines.append(f"  kv cache     : {s.kv_cache or 'not quantized'}{kv_scales}")
    lines.append("  layer formats:")
    width = max((len(g.format) for g in s.formats), default=10)
    for g in s.formats:
        lines.append(
            f"    {g.format:<{width}} {g.layers:>5} layers {_count(g.parameters):>8} params "
            f"{g.bits_per_parameter:6.2f} bits/param  [{_leaves(g)}]"
        )
    shown = ", ".join(s.excluded[:8]) + (f", ... ({len(s.excluded) - 8} more)" if len(s.excluded) > 8 else "")
    lines.append(f"  excluded     : {len(s.excluded)}" + (f" ({shown})" if s.excluded else ""))
    if s.moe:
        lines.append(
            f"  experts      : {s.moe['layers']} MoE layers x {s.moe['experts_per_layer']} experts, "
            f"{s.moe['naming']}" + (f", family {s.moe['family']}" if s.moe.get("family") else "")
        )
    if s.coverage:
        summary = s.coverage.get("summary") or {}
        line = "  coverage     : " + ", ".join(f"{k} {v}" for k, v in summary.items())
        lines.append(line if summary else "  coverage     : recorded (no summary)")
        for layer, experts in list((s.coverage.get("experts_without_tokens") or {}).items())[:5]:
            lines.append(f"    {layer}: experts {experts} saw no calibration tokens")
    for problem in s.problems:
        lines.append(f"  unreadable   : {problem}")
    return "\n".join(lines) + "\n"
