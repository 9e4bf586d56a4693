"""KV-cache scales: names, dtype, shape and coverage (engine-contract.md §2 "KV-cache scales", §4, §8.9).

ModelOpt writes ``<attn>.k_proj.k_scale`` / ``<attn>.v_proj.v_scale``, compressed-tensors
``<attn>.k_scale`` / ``<attn>.v_scale``; fp32 scalars (CT may use one per KV head,
``[num_kv_heads, 1, 1]``). A missing scale silently defaults to 1.0 in vLLM.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from ..findings import Finding, Rule, Severity
from ..qconfig import Format
from ..structure import Context

__all__ = ["check"]

NAME = Rule(
    "kv.name",
    "a KV-cache scale has a name the engines do not map",
    "name KV scales <attn>.k_proj.k_scale / <attn>.v_proj.v_scale (ModelOpt) or <attn>.k_scale / "
    "<attn>.v_scale (compressed-tensors)",
)
DTYPE = Rule(
    "kv.dtype", "a KV-cache scale is not an fp32 scalar", "write each KV scale as a float32 0-D tensor (amax / 448)"
)
PARTIAL = Rule(
    "kv.partial",
    "some attention layers have KV-cache scales and others do not",
    "export k and v scales for every attention layer (missing ones default to 1.0)",
)
MISSING = Rule(
    "kv.missing",
    "the config quantizes the KV cache but no KV-cache scale is stored",
    "calibrate the KV cache (the engine uses 1.0 for every layer otherwise)",
    Severity.WARNING,
)
UNUSED = Rule(
    "kv.unused",
    "KV-cache scales are stored but the config does not quantize the KV cache",
    "set kv_cache_scheme / kv_cache_quant_algo, or drop the scales",
    Severity.WARNING,
)

_MODELOPT_NAME = re.compile(r"^(?P<attn>.+)\.(?P<kv>[kv])_proj\.(?P=kv)_scale$")
_CT_NAME = re.compile(r"^(?P<attn>.+\.(self_attn|attention|attn))\.(?P<kv>[kvq])_scale$")
_ACCEPTED = re.compile(r"\.(qkv_proj\.[kv]_scale|kv_scale)$")
_ANY_NAME = re.compile(r"^(?P<attn>.+?)\.(?:(?:[kv]|qkv)_proj\.)?(?P<kv>[kvq])_scale$")
_KV_PARAMS = ("k_scale", "v_scale", "kv_scale", "q_scale")


def _attention_modules(ctx: Context) -> set[str]:
    parents = set()
    for module in ctx.modules:
        parent, _, leaf = module.rpartition(".")
        if leaf in ("k_proj", "v_proj", "kv_a_proj_with_mqa", "qkv_proj") and not ctx.is_vision(module):
            parents.add(parent)
    return parents


def _names(ctx: Context, fmt: Format) -> Iterator[Finding | tuple[str, str]]:
    """Findings about names and dtypes, and (attention module, k|v|q) for every KV scale found."""
    canonical, other = (_MODELOPT_NAME, _CT_NAME) if fmt is Format.MODELOPT else (_CT_NAME, _MODELOPT_NAME)
    for info in ctx.sorted_tensors:
        name = info.name
        if name.rpartition(".")[2] not in _KV_PARAMS:
            continue
        match = canonical.match(name)
        if match is None:
            accepted = _ACCEPTED.search(name) is not None or other.match(name) is not None
            yield NAME.finding(
                name,
                f"{name} is not a {fmt} KV-scale name"
                + (" (vLLM remaps it, other readers may not)" if accepted else ""),
                severity=Severity.WARNING if accepted else None,
            )
            match = _ANY_NAME.match(name) if accepted else None
            if match is None:
                continue
        yield match["attn"], match["kv"]
        per_head = fmt is Format.COMPRESSED_TENSORS and info.ndim == 3 and info.shape[1:] == (1, 1)
        if info.dtype != "F32" or not (info.is_scalar or per_head):
            severity = Severity.WARNING if fmt is Format.COMPRESSED_TENSORS and info.dtype != "F32" else None
            yield DTYPE.finding(name, f"{name} is {info.dtype} {list(info.shape)}", severity=severity)


def check(ctx: Context) -> Iterator[Finding]:
    fmt = ctx.qcfg.format
    if fmt not in (Format.MODELOPT, Format.COMPRESSED_TENSORS):
        return
    covered: dict[str, set[str]] = {}
    for item in _names(ctx, fmt):
        if isinstance(item, tuple):
            covered.setdefault(item[0], set()).add(item[1])
        else:
            yield item
    attention = _attention_modules(ctx) | set(covered)
    quantized_kv = ctx.qcfg.kv_cache is not None
    if covered and not quantized_kv:
        yield UNUSED.finding(ctx.qcfg.source, f"{len(covered)} attention layers have KV scales")
    if quantized_kv and not covered:
        yield MISSING.finding(
            ctx.qcfg.source, f"KV cache {ctx.qcfg.kv_cache} with no scales in {len(attention)} attention layers"
        )
    elif covered:
        for attn in sorted(attention):
            missing = {"k", "v"} - covered.get(attn, set())
            if missing:
                yield PARTIAL.finding(
                    attn,
                    f"{attn} has no {' / '.join(sorted(missing))} scale while other "
                    "layers have them; vLLM uses 1.0 here",
                )
