"""What an engine does with a whole model family: forms known not to load, untied output heads, and ignore
lists the family's name mapper breaks. The facts are data in :mod:`quantport.arch.engines` and the family's
:class:`~quantport.arch.experts.ExpertLayout`, shared with the exporter, which refuses the same forms.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from quantport.arch.engines import ENGINE_DOES_NOT_TIE, known_failure
from quantport.arch.experts import ExpertIgnore

from ..findings import Engine, Finding, Rule, Severity
from ..qconfig import Format
from ..structure import Context, is_quantized

__all__ = ["check"]

KNOWN_FAILURE = Rule(
    "engine.known-failure",
    "a family x format x scheme the engine is known not to load",
    "write the form the message names (quantport refuses this form unless --allow-check-errors)",
)
LM_HEAD_UNTIED = Rule(
    "engine.lm-head-untied",
    "tied embeddings, no lm_head.weight, and an engine class that does not tie",
    "write lm_head.weight (a copy of the input embedding) into the checkpoint; "
    "the engine leaves the head uninitialised otherwise and generates garbage without an error",
)
EXPERT_IGNORE = Rule(
    "engine.expert-ignore-names",
    "per-expert ignore entries for a family whose engine loader renames them",
    r"ignore the experts module with one regex entry, e.g. "
    r"re:model\.layers\.0\.mlp\.experts\..* , instead of experts.{e}.<leaf> names",
)

_PER_EXPERT_NAME = re.compile(r"\.experts\.\d+\.[^.]+$")


def _model_types(ctx: Context) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for t in (ctx.facts.model_type, ctx.facts.text_model_type) if t))


def _experts_quantized(ctx: Context) -> bool:
    for prefix, block in ctx.moe_blocks.items():
        modules = [prefix] if block.fused else block.modules()
        if any(is_quantized(ctx.modules.get(m, {})) for m in modules):
            return True
    return False


def _severity(ctx: Context) -> Severity | None:
    """The facts are vLLM's: for SGLang they are a warning."""
    return Severity.WARNING if ctx.engine is Engine.SGLANG else None


def _known_failures(ctx: Context) -> Iterator[Finding]:
    if ctx.qcfg.format in (Format.NONE, Format.UNKNOWN):
        return
    quantized = _experts_quantized(ctx)
    for model_type in _model_types(ctx):
        failure = known_failure(model_type, ctx.qcfg.format.value, None, quantized)
        if failure is not None:
            yield KNOWN_FAILURE.finding(ctx.qcfg.source or "config.json", failure.message(), severity=_severity(ctx))
            return


def _tied(config: dict) -> bool:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))


def _untied_head(ctx: Context) -> Iterator[Finding]:
    config = ctx.ckpt.config or {}
    untied = [t for t in _model_types(ctx) if t in ENGINE_DOES_NOT_TIE]
    if not untied or not _tied(config):
        return
    if any(name == "lm_head.weight" or name.endswith(".lm_head.weight") for name in ctx.ckpt.tensors):
        return
    yield LM_HEAD_UNTIED.finding(
        "lm_head.weight",
        f"config.json says tie_word_embeddings, but vLLM's "
        f"{ENGINE_DOES_NOT_TIE[untied[0]]} does not tie, and the checkpoint has no "
        "lm_head.weight: the head stays uninitialised",
        severity=_severity(ctx),
    )


def _expert_ignore(ctx: Context) -> Iterator[Finding]:
    layout = ctx.layout
    if ctx.qcfg.format is not Format.COMPRESSED_TENSORS or layout is None:
        return
    if layout.ct_ignore is not ExpertIgnore.PATTERN:
        return
    named = [p for p in ctx.qcfg.ignore if not p.startswith("re:") and _PER_EXPERT_NAME.search(p)]
    if named:
        yield EXPERT_IGNORE.finding(
            ctx.qcfg.source or "config.json",
            f"{len(named)} ignore entries name single "
            f"experts' projections (e.g. {named[0]}); vLLM's {layout.family} name mapper "
            "rewrites those ending in .down_proj to its fused w2_weight, so gate/up are "
            "ignored and down is not, and vLLM refuses the layer ('All MoE projections need "
            "to have same quantization scheme but found multiple')",
            severity=_severity(ctx),
        )


def check(ctx: Context) -> Iterator[Finding]:
    yield from _known_failures(ctx)
    yield from _untied_head(ctx)
    yield from _expert_ignore(ctx)
