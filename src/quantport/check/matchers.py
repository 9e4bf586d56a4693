"""Exclusion matchers, re-implemented from the engines' documented behaviour (engine-contract.md).

Each matcher answers, for one engine layer (``...qkv_proj``, ``...experts``, ``lm_head``) and the
checkpoint modules loaded into it (its shards), whether the engine leaves the layer unquantized.
A :class:`Decision` also says when the engine would refuse the list outright because the shards of
one fused layer disagree.

* vLLM ModelOpt (§1.5): exact names with fused-shard expansion (all shards or none), the ``experts``
  substring rule, a plain substring test (also with ``language_model.`` stripped), and ``fnmatch``;
  patterns ending in ``*`` without a dot before it are first split into ``p`` and ``p.*``.
* SGLang ModelOpt (§6): each pattern becomes a regex (``.`` literal, ``*`` -> ``.*``) that must
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

__all__ = ["Decision", "ct_decision", "ct_matches", "is_class_name", "sglang_decision", "vllm_decision"]

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


def vllm_decision(layer: str, shards: Sequence[str], patterns: Sequence[str]) -> Decision:
    """vLLM's ``is_layer_excluded`` for ModelOpt: exact (with shards), substring, fnmatch."""
    expanded = _vllm_expand(patterns)
    exact = set(expanded)
    if layer.endswith(".experts") or layer == "experts":
        hit = next((p for p in expanded if p == layer or ("experts" in p and layer in p)), None)
        if hit is not None:
            return Decision(True, reason=f"exact/experts match of {hit!r}")
    elif len(shards) > 1 or shards[0] != layer:
        hits = [s in exact for s in shards]
        if all(hits):
            return Decision(True, reason="every shard is listed by name")
        if any(hits):
            return Decision(True, partial=True, reason="some but not all shards are listed by name")
    elif layer in exact:
        return Decision(True, reason=f"exact match of {layer!r}")
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
    """SGLang's ModelOpt exclusion: regex fullmatch of the prefix or of one of its parts."""
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


def ct_matches(name: str, entry: str) -> bool:
    """compressed-tensors name matching: ``re:<regex>`` (``re.match``) or the exact name."""
    if entry.startswith("re:"):
        try:
            return re.match(entry[3:], name) is not None
        except re.error:
            return False
    return entry == name


def ct_decision(layer: str, shards: Sequence[str], patterns: Sequence[str]) -> Decision:
    """compressed-tensors ``ignore``, evaluated per shard: all shards or none."""
    names = [p for p in patterns if not is_class_name(p)]
    hits = [next((p for p in names if ct_matches(s, p)), None) for s in shards]
    if all(h is not None for h in hits):
        return Decision(True, reason=f"ignore entry {hits[0]!r}")
    if any(h is not None for h in hits):
        return Decision(True, partial=True, reason="some but not all shards match the ignore list")
    return Decision(False)
