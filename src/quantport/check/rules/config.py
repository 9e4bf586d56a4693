"""config.json ``quantization_config`` and ``hf_quant_config.json`` (engine-contract.md §1, §4, §6, §8.1)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from quantport.read import model_field_problems

from ..checkpoint import CONFIG_FILE, HF_QUANT_CONFIG_FILE
from ..findings import Engine, Finding, Rule, Severity
from ..qconfig import Format, QuantConfig, config_quant_block
from ..structure import Context

__all__ = ["CT_FORMATS", "ENGINE_ALGOS", "MODELOPT_ALGOS", "check"]

MODELOPT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8", "MIXED_PRECISION")
"""``quant_algo`` values vLLM 0.33's ModelOpt reader accepts."""
ENGINE_ALGOS: dict[Engine, frozenset[str]] = {
    Engine.VLLM: frozenset(MODELOPT_ALGOS),
    Engine.SGLANG: frozenset({"FP8", "NVFP4", "W4A16_NVFP4", "MXFP8", "MIXED_PRECISION"}),
}
LEGACY_ALGOS = frozenset({"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "MIXED_PRECISION"})
"""Algorithms vLLM understands in the nested hf_quant_config.json form (§1.2)."""
CT_FORMATS = frozenset(
    {
        "dense",
        "int-quantized",
        "float-quantized",
        "naive-quantized",
        "pack-quantized",
        "nvfp4-pack-quantized",
        "mxfp4-pack-quantized",
        "mxfp8-quantized",
        "mixed-precision",
    }
)
KV_ALGOS = frozenset({"FP8", "NVFP4"})
MIXED_LAYER_ALGOS = frozenset(
    {"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "FP8_BLOCK_SCALES", "NVFP4", "W4A16_NVFP4", "MXFP8"}
)

MISSING = Rule(
    "config.missing",
    "config.json is missing or unreadable",
    "write the model's config.json (with quantization_config) into the checkpoint",
)
NO_QUANT = Rule(
    "config.no-quantization",
    "no quantization config in config.json nor hf_quant_config.json",
    "add quantization_config to config.json; this checkpoint is not marked as quantized",
)
QUANT_METHOD = Rule(
    "config.quant-method",
    "quant_method is missing or not modelopt / compressed-tensors",
    'set quantization_config.quant_method to "modelopt" or "compressed-tensors"',
)
QUANT_ALGO = Rule(
    "config.quant-algo",
    "ModelOpt quant_algo is missing or not one vLLM accepts",
    f"use one of {', '.join(MODELOPT_ALGOS)}",
)
ENGINE_ALGO = Rule(
    "config.engine-algo",
    "quant_algo is valid ModelOpt but this engine cannot load it",
    "choose a recipe this engine supports (SGLang's ModelOpt reader takes FP8, NVFP4, "
    "W4A16_NVFP4, MXFP8), or serve with vLLM",
)
LEGACY_ONLY = Rule(
    "config.legacy-only",
    "config.json has no quantization_config; only hf_quant_config.json",
    "add the flat quantization_config block to config.json (vLLM reads config.json first)",
    Severity.WARNING,
)
IGNORE_TYPE = Rule(
    "config.ignore-type",
    "the exclusion list is not a list of strings",
    'write "ignore" (and "exclude_modules") as a JSON list of module names or patterns',
)
GROUP_SIZE = Rule(
    "config.group-size",
    "group_size does not match the format (NVFP4: 16, MXFP8: 32)",
    "set group_size to the block size of the format",
)
KV_CACHE = Rule(
    "config.kv-cache",
    "the KV-cache setting is not one the engine understands",
    'use kv_cache_scheme {"type": "float", "num_bits": 8, "dynamic": false} '
    '(hf_quant_config.json: "kv_cache_quant_algo": "FP8" or null)',
)
MIXED = Rule(
    "config.mixed-precision",
    "MIXED_PRECISION without a valid quantized_layers map",
    'write "quantized_layers": {"<module>": {"quant_algo": ...}} for every quantized layer',
)
CT_FORMAT = Rule(
    "config.ct-format", "compressed-tensors format is missing or unknown", f"use one of {', '.join(sorted(CT_FORMATS))}"
)
CT_GROUP = Rule(
    "config.ct-group",
    "a compressed-tensors config group is incomplete or inconsistent",
    "give every group targets and weights with num_bits, type and strategy (and group_size / "
    "block_structure where the strategy needs it)",
)
CT_STATUS = Rule(
    "config.ct-status",
    'quantization_status is not "compressed"',
    "save the checkpoint compressed (quantization_status: compressed)",
    Severity.WARNING,
)
QUANT_CONFIG_TYPE = Rule(
    "config.quant-config-type",
    "quantization_config is not a JSON object",
    'write quantization_config as an object {"quant_method": ..., ...}; engines crash on a '
    "string or a list, and null means unquantized",
)
MODEL_FIELD = Rule(
    "config.model-field",
    "a size field of config.json is not a valid integer",
    "write hidden_size, num_hidden_layers, vocab_size, ... as the model's integer sizes (copy "
    "config.json from the base model); transformers and the engines build the model from them",
)
HFQ_UNREADABLE = Rule(
    "hfq.unreadable",
    "hf_quant_config.json is not valid JSON",
    "rewrite hf_quant_config.json (or delete it when config.json has the quantization_config)",
)
HFQ_PRODUCER = Rule(
    "hfq.producer",
    'hf_quant_config.json producer.name is not "modelopt"',
    'set producer.name to "modelopt" (engines detect the format by it)',
)
HFQ_KEY = Rule(
    "hfq.missing-key",
    "hf_quant_config.json lacks a key the engines require",
    "write quantization.quant_algo, quantization.kv_cache_quant_algo (null allowed) and quantization.exclude_modules",
)
HFQ_GROUP_SIZE = Rule(
    "hfq.group-size",
    "NVFP4 hf_quant_config.json has no group_size",
    'add "group_size": 16 to the quantization block of hf_quant_config.json',
)
HFQ_MISMATCH = Rule(
    "hfq.mismatch",
    "hf_quant_config.json disagrees with config.json",
    "write both files from the same settings (re-export)",
)


def _modelopt_findings(ctx: Context, q: QuantConfig) -> Iterator[Finding]:
    src = q.source
    algo = q.quant_algo
    if algo not in MODELOPT_ALGOS:
        yield QUANT_ALGO.finding(src, f"quant_algo {algo!r} is not accepted by vLLM's ModelOpt reader")
        return
    if algo not in ENGINE_ALGOS[ctx.engine]:
        yield ENGINE_ALGO.finding(src, f"{ctx.engine} cannot load ModelOpt quant_algo {algo}")
    if q.nested and src == HF_QUANT_CONFIG_FILE:
        legacy_ok = algo in LEGACY_ALGOS or ctx.engine is Engine.SGLANG
        yield LEGACY_ONLY.finding(
            CONFIG_FILE,
            "config.json has no quantization_config; engines fall back to hf_quant_config.json"
            + ("" if legacy_ok else f", where vLLM raises 'Unknown ModelOpt quant algo' for {algo}"),
            severity=None if legacy_ok else Severity.ERROR,
        )
    ignore_key = "exclude_modules" if q.nested else ("ignore" if "ignore" in q.raw else "exclude_modules")
    holder = q.raw.get("quantization", {}) if q.nested else q.raw
    value = holder.get(ignore_key) if isinstance(holder, dict) else None
    if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        yield IGNORE_TYPE.finding(src, f"{ignore_key} is {type(value).__name__}, not a list of strings")
    expected_group = {"NVFP4": 16, "W4A16_NVFP4": 16, "MXFP8": 32}.get(algo)
    if q.group_size is not None and expected_group is not None and q.group_size != expected_group:
        yield GROUP_SIZE.finding(src, f"group_size {q.group_size!r} for {algo}, expected {expected_group}")
    scheme = q.raw.get("kv_cache_scheme") if not q.nested else None
    if scheme is not None and not isinstance(scheme, dict) or isinstance(scheme, dict) and q.kv_cache is None:
        yield KV_CACHE.finding(
            src, f"kv_cache_scheme {scheme!r} is read by vLLM as 'no KV-cache quantization'", severity=Severity.WARNING
        )
    if algo == "MIXED_PRECISION":
        yield from _mixed_findings(q)
        algos = (
            {str(e.get("quant_algo", "")).upper() for e in q.quantized_layers.values() if isinstance(e, dict)}
            if isinstance(q.quantized_layers, dict)
            else set()
        )
        if ctx.engine is Engine.SGLANG and not any("NVFP4" in a for a in algos):
            yield ENGINE_ALGO.finding(
                src, f"SGLang reads MIXED_PRECISION without an NVFP4 layer as w4afp8 (layers use {sorted(algos)})"
            )


def _mixed_findings(q: QuantConfig) -> Iterator[Finding]:
    layers = q.quantized_layers
    if not isinstance(layers, dict) or not layers:
        yield MIXED.finding(q.source, "quant_algo MIXED_PRECISION but quantized_layers is missing or empty")
        return
    for module, entry in sorted(layers.items()):
        algo = entry.get("quant_algo") if isinstance(entry, dict) else None
        if not isinstance(algo, str) or algo.upper() not in MIXED_LAYER_ALGOS:
            yield MIXED.finding(module, f"quantized_layers[{module!r}] has quant_algo {algo!r}")


def _hf_quant_findings(ctx: Context, q: QuantConfig) -> Iterator[Finding]:
    hfq = ctx.ckpt.hf_quant_config
    if hfq is None:
        return
    src = HF_QUANT_CONFIG_FILE
    if q.format is not Format.MODELOPT:
        yield HFQ_MISMATCH.finding(
            src,
            f"hf_quant_config.json is present but config.json declares {q.format}",
            severity=Severity.WARNING,
            fix="delete the stale hf_quant_config.json",
        )
        return
    producer = hfq.get("producer")
    if not isinstance(producer, dict) or producer.get("name") != "modelopt":
        yield HFQ_PRODUCER.finding(src, f"producer is {producer!r}")
    quant = hfq.get("quantization")
    if not isinstance(quant, dict):
        yield HFQ_KEY.finding(src, "no 'quantization' object")
        return
    algo = str(quant.get("quant_algo", "")).upper() or None
    required = ["quant_algo", "kv_cache_quant_algo"] + ([] if algo == "MIXED_PRECISION" else ["exclude_modules"])
    for key in required:
        if key not in quant:
            yield HFQ_KEY.finding(src, f"quantization.{key} is missing")
    if algo and "NVFP4" in algo and "group_size" not in quant:
        yield HFQ_GROUP_SIZE.finding(src, f"quant_algo {algo} without quantization.group_size")
    kv = quant.get("kv_cache_quant_algo")
    if kv is not None and (not isinstance(kv, str) or kv.upper() not in KV_ALGOS):
        yield KV_CACHE.finding(src, f"kv_cache_quant_algo {kv!r} is not FP8, NVFP4 or null")
    if q.source == HF_QUANT_CONFIG_FILE:
        return
    yield from _compare(q, quant, algo)


def _compare(q: QuantConfig, quant: dict[str, Any], algo: str | None) -> Iterator[Finding]:
    src = HF_QUANT_CONFIG_FILE
    if algo != q.quant_algo:
        yield HFQ_MISMATCH.finding(src, f"quant_algo is {algo!r} here but {q.quant_algo!r} in config.json")
    kv = quant.get("kv_cache_quant_algo")
    kv = kv.upper() if isinstance(kv, str) else None
    if kv != q.kv_cache:
        yield HFQ_MISMATCH.finding(
            src, f"kv_cache_quant_algo is {kv!r} here but config.json's kv_cache_scheme means {q.kv_cache!r}"
        )
    if "group_size" in quant and q.group_size is not None and quant["group_size"] != q.group_size:
        yield HFQ_MISMATCH.finding(
            src, f"group_size is {quant['group_size']!r} here but {q.group_size!r} in config.json"
        )
    excl = quant.get("exclude_modules")
    if isinstance(excl, list) and set(map(str, excl)) != set(q.ignore):
        diff = sorted(set(map(str, excl)) ^ set(q.ignore))
        yield HFQ_MISMATCH.finding(src, f"exclude_modules differs from config.json's ignore list: {diff[:6]}")


def _ct_findings(q: QuantConfig) -> Iterator[Finding]:
    src = q.source
    if q.raw.get("ignore") is not None and not (
        isinstance(q.raw["ignore"], list) and all(isinstance(v, str) for v in q.raw["ignore"])
    ):
        yield IGNORE_TYPE.finding(src, "ignore is not a list of strings")
    if q.ct_format not in CT_FORMATS:
        yield CT_FORMAT.finding(src, f"format {q.ct_format!r}")
    status = q.raw.get("quantization_status")
    if status not in (None, "compressed"):
        yield CT_STATUS.finding(src, f"quantization_status is {status!r}")
    if not q.ct_groups:
        yield CT_GROUP.finding(src, "config_groups is missing or empty")
    for group in q.ct_groups:
        yield from _ct_group_findings(src, group)
    kv = q.raw.get("kv_cache_scheme")
    if kv is not None and q.kv_cache != "FP8":
        yield KV_CACHE.finding(src, f"kv_cache_scheme {kv!r} is not an 8-bit float scheme", severity=Severity.WARNING)


def _ct_group_findings(src: str, group: Any) -> Iterator[Finding]:
    where = f"{src}: config_groups.{group.name}"
    if not group.targets:
        yield CT_GROUP.finding(where, "group has no targets")
    if group.format is not None and group.format not in CT_FORMATS:
        yield CT_FORMAT.finding(where, f"group format {group.format!r}")
    w = group.weights
    if w is None:
        yield CT_GROUP.finding(where, "group has no weights arguments")
        return
    if w.get("type") not in ("int", "float") or not isinstance(w.get("num_bits"), int):
        yield CT_GROUP.finding(where, f"weights type {w.get('type')!r} / num_bits {w.get('num_bits')!r}")
    strategy = w.get("strategy")
    if strategy in ("group", "tensor_group") and not isinstance(w.get("group_size"), int):
        yield CT_GROUP.finding(where, f"strategy {strategy} without an integer group_size")
    if strategy == "block" and not (isinstance(w.get("block_structure"), list) and len(w["block_structure"]) == 2):
        yield CT_GROUP.finding(where, "strategy block without block_structure [rows, cols]")
    acts = group.input_activations
    if acts and acts.get("strategy") == "token" and acts.get("dynamic") is not True:
        yield CT_GROUP.finding(where, "token-strategy activations must be dynamic")


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "value")


def _block_type_findings(config: dict[str, Any] | None) -> Iterator[Finding]:
    """quantization_config (or compression_config) that exists but is not an object."""
    if not isinstance(config, dict):
        return
    for prefix, holder in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(holder, dict):
            continue
        for key in ("quantization_config", "compression_config"):
            value = holder.get(key)
            if value is not None and not isinstance(value, dict):
                yield QUANT_CONFIG_TYPE.finding(
                    CONFIG_FILE, f"{prefix}{key} is a JSON {_json_type(value)} ({str(value)[:60]!r}), not an object"
                )


def _file_findings(ckpt: Any) -> Iterator[Finding]:
    """The JSON files themselves: readable, config.json present, its size fields integers."""
    for name, error in sorted(ckpt.json_errors.items()):
        if name in (CONFIG_FILE, HF_QUANT_CONFIG_FILE):
            yield (MISSING if name == CONFIG_FILE else HFQ_UNREADABLE).finding(name, error)
    if ckpt.config is None and CONFIG_FILE not in ckpt.json_errors:
        yield MISSING.finding(CONFIG_FILE, "config.json does not exist")
    for problem in model_field_problems(ckpt.config):
        yield MODEL_FIELD.finding(CONFIG_FILE, f"config.json: {problem.describe()}")


def check(ctx: Context) -> Iterator[Finding]:
    ckpt, q = ctx.ckpt, ctx.qcfg
    yield from _file_findings(ckpt)
    type_findings = list(_block_type_findings(ckpt.config))
    yield from type_findings
    if q.format is Format.NONE and type_findings:
        return
    if q.format is Format.NONE:
        yield NO_QUANT.finding(CONFIG_FILE, "neither config.json nor hf_quant_config.json has a quantization config")
        return
    block = config_quant_block(ckpt.config)
    if block is not None and not q.nested and q.format is Format.UNKNOWN:
        yield QUANT_METHOD.finding(
            CONFIG_FILE, f"quant_method {q.quant_method!r} is not modelopt or compressed-tensors"
        )
    if q.format is Format.MODELOPT:
        yield from _modelopt_findings(ctx, q)
    elif q.format is Format.COMPRESSED_TENSORS:
        yield from _ct_findings(q)
    elif q.format is Format.MXFP4 and ctx.facts.model_type != "gpt_oss":
        yield QUANT_METHOD.finding(
            CONFIG_FILE, f"quant_method mxfp4 is GPT-OSS's native format, but model_type is {ctx.facts.model_type!r}"
        )
    yield from _hf_quant_findings(ctx, q)
