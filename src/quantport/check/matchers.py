"""Exclusion matchers, re-implemented from the engines' documented behaviour (engine-contract.md).

Each matcher answers, for one engine layer (``...qkv_proj``, ``...experts``, ``lm_head``) and the
checkpoint modules loaded into it (its shards), whether the engine leaves the layer unquantized.
A :class:`Decision` also says when the engine would refuse the list outright because the shards of
one fused layer disagree.

* vLLM ModelOpt (§1.5): exact names with fused-shard expansion (all shards or none), the ``experts``
  substring rule, a plain substring test (also with ``language_model.`` stripped), and ``fnmatch``;
  patterns ending in ``*`` without a dot before it are first split into ``p`` and ``p.*``.
* SGLang ModelOpt (§6): the same exact-name check with fused shards (SGLang's ``is_layer_skipped``,
  seen in its source), then each pattern as a regex (``.`` literal, ``*`` -> ``.*``) that must
  fullmatch the prefix or one of its dot-separated parts (also with ``language_model.`` stripped);
  DeepSeek's fused MLA names match by substring of the last segment.
* compressed-tensors (§4): exact names or ``re:`` regexes (``re.match``), evaluated per shard; a
  mixed answer over the shards of a fused layer is an error.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..read.dialect import ct_name_matches as ct_matches

__all__ = [
    "Decision",
    "ct_decision",
    "ct_matches",
    "is_class_name",
    "mixed_decision",
    "sglang_decision",
    "vllm_decision",
]

_LANGUAGE_MODEL = "language_model."
_MLA_FUSED = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
_CLASS_NAME = re.compile(r"^[A-Z][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Decision:
    """What an engine decides for one layer.

    Attributes:
        excluded: the layer is left unquantized.
        partial: some but not all shards match exactly (the engine raises at load).
        reason: the pattern (and matcher) that decided, for messages.
    """

    excluded: bool
    partial: bool = False
    reason: str = ""


def _vllm_expand(patterns: Sequence[str]) -> list[str]:
    """vLLM's mapper workaround: ``x*`` (no dot before the star) -> ``x`` and ``x.*``."""
    out: list[str] = []
    for p in patterns:
        if p.endswith("*") and not p.endswith(".*"):
            out.extend((p[:-1], p[:-1] + ".*"))
        else:
            out.append(p)
    return out


def _exact_decision(layer: str, shards: Sequence[str], patterns: Sequence[str]) -> Decision | None:
    """``is_layer_skipped`` (shared by vLLM and SGLang): exact names, a fused layer by its shards."""
    exact = set(patterns)
    if layer.endswith(".experts") or layer == "experts":
        hit = next((p for p in patterns if p == layer or ("experts" in p and layer in p)), None)
        return Decision(True, reason=f"exact/experts match of {hit!r}") if hit is not None else None
    if len(shards) > 1 or shards[0] != layer:
        hits = [s in exact for s in shards]
        if all(hits):
            return Decision(True, reason="every shard is listed by name")
        if any(hits):
            return Decision(True, partial=True, reason="some but not all shards are listed by name")
        return None
    return Decision(True, reason=f"exact match of {layer!r}") if layer in exact else None


def vllm_decision(layer: str, shards: Sequence[str], patterns: Sequence[str]) -> Decision:
    """vLLM's ``is_layer_excluded`` for ModelOpt: exact (with shards), substring, fnmatch."""
    expanded = _vllm_expand(patterns)
    exact = _exact_decision(layer, shards, expanded)
    if exact is not None:
        return exact
    stripped = layer.removeprefix(_LANGUAGE_MODEL)
    for p in expanded:
        if p and (p in layer or p in stripped):
            return Decision(True, reason=f"substring match of {p!r}")
        if fnmatch.fnmatchcase(layer, p):
            return Decision(True, reason=f"fnmatch of {p!r}")
    return Decision(False)


def _sglang_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern.replace(".", r"\.").replace("*", ".*"))


def sglang_decision(layer: str, shards: Sequence[str], patterns: Sequence[str]) -> Decision:
    """SGLang's ModelOpt exclusion: exact names with fused shards (``is_layer_skipped``), then a regex
    fullmatch of the prefix or of one of its parts."""
    exact = _exact_decision(layer, shards, patterns)
    if exact is not None:
        return exact
    names = {layer, layer.removeprefix(_LANGUAGE_MODEL)}
    last = layer.rsplit(".", 1)[-1]
    for p in patterns:
        try:
            regex = _sglang_regex(p)
        except re.error:
            continue
        for name in names:
            if regex.fullmatch(name) or any(regex.fullmatch(part) for part in name.split(".")):
                return Decision(True, reason=f"regex match of {p!r}")
        tail = p.rsplit(".", 1)[-1]
        if tail in _MLA_FUSED and tail in last:
            return Decision(True, reason=f"fused MLA name {tail!r} in {last!r}")
    return Decision(False)


def is_class_name(entry: str) -> bool:
    """A compressed-tensors target/ignore entry naming a module class (``Linear``)."""
    return bool(_CLASS_NAME.match(entry))


def ct_decision(layer: str, shards: Sequence[str], patterns: Sequence[str]) -> Decision:
    """vLLM's compressed-tensors ``should_ignore_layer`` (exact names or ``re:``; class names never
    ignore). A plain layer by its own name; a fused layer by its name listed exactly, else per shard,
    all shards or none. A MoE ``experts`` layer as vLLM 0.32's ``CompressedTensorsMoEMethod`` decides
    it: by the names of expert 0's projections (``<experts>.0.<gate|up|down leaf>``), which must all
    be ignored or none (else vLLM raises "All MoE projections need to have same quantization scheme");
    the experts module's own name is not consulted."""
    names = [p for p in patterns if not is_class_name(p)]
    if layer.endswith("experts"):
        first = [s for s in shards if s.startswith(f"{layer}.0.")]
        first = first or [f"{layer}.0.{leaf}" for leaf in ("gate_proj", "up_proj", "down_proj")]
        return _all_or_none(
            [next((p for p in names if ct_matches(s, p)), None) for s in first],
            "some but not all of expert 0's projections match the ignore list",
        )
    if len(shards) == 1 and shards[0] == layer:
        hit = next((p for p in names if ct_matches(layer, p)), None)
        return Decision(hit is not None, reason=f"ignore entry {hit!r}" if hit else "")
    if layer in names:
        return Decision(True, reason=f"ignore entry {layer!r}")
    return _all_or_none(
        [next((p for p in names if ct_matches(s, p)), None) for s in shards],
        "some but not all shards match the ignore list",
    )


def _all_or_none(hits: list[str | None], partial_reason: str) -> Decision:
    if all(h is not None for h in hits):
        return Decision(True, reason=f"ignore entry {hits[0]!r}")
    if any(h is not None for h in hits):
        return Decision(True, partial=True, reason=partial_reason)
    return Decision(False)


def mixed_decision(layer: str, shards: Sequence[str], quantized_layers: Sequence[str]) -> Decision:
    """ModelOpt MIXED_PRECISION: a layer is quantized only when ``quantized_layers`` lists it; every
    shard of a fused layer must be listed alike (an experts layer: any entry under its prefix)."""
    listed = set(quantized_layers)
    if layer.endswith("experts"):
        hit = layer in listed or any(name.startswith(layer + ".") for name in listed)
        return Decision(not hit, reason="" if hit else "not in quantized_layers")
    hits = [s in listed for s in shards] if shards[0] != layer or len(shards) > 1 else [layer in listed]
    if len(shards) > 1 and layer in listed:
        hits = [True] * len(shards)
    if all(hits):
        return Decision(False)
    if any(hits):
        return Decision(True, partial=True, reason="some but not all shards are in quantized_layers")
    return Decision(True, reason="not in quantized_layers")
