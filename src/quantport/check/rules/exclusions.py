"""Excluded modules are exactly those without scale tensors, as each engine's own matcher sees it
(engine-contract.md §1.5, §4, §6, §8.2).

The engine decides per *engine layer*: a fused ``qkv_proj`` / ``gate_up_proj`` or a whole MoE
``experts`` module, made of several checkpoint modules (shards). For every such layer the check
compares the engine's decision with what is on disk:

* excluded but carrying scales: the engine builds an unquantized layer and fails on the extra
  tensors ("no parameter named ...input_scale", vLLM issue #44081);
* not excluded but without scales: the engine builds a quantized layer and loads bf16 weights into
  it (shape errors for packed formats, garbage for FP8);
* shards that disagree, on disk or in the list: the engine cannot run them as one GEMM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from ..findings import Engine, Finding, Rule, Severity
from ..matchers import Decision, ct_decision, ct_matches, is_class_name, mixed_decision, sglang_decision, vllm_decision
from ..qconfig import Format
from ..structure import Context, is_quantized

__all__ = ["check", "decider", "engine_excludes"]

EXCLUDED_HAS_SCALES = Rule(
    "exclusion.excluded-has-scales",
    "an excluded layer carries scale tensors",
    "delete the scale tensors of the excluded layer, or remove it from the exclusion list and quantize it",
)
QUANTIZED_EXCLUDED = Rule(
    "exclusion.quantized-excluded",
    "a quantized layer is listed as excluded",
    "remove the layer from ignore / exclude_modules (or fix the pattern that matches it)",
)
UNLISTED = Rule(
    "exclusion.unlisted",
    "an unquantized layer is not in the exclusion list",
    "add the module to ignore / exclude_modules (both config files), or quantize it",
)
UNTARGETED = Rule(
    "exclusion.untargeted",
    "a quantized layer matches no compressed-tensors config group target",
    "add a target (module name, re: pattern or Linear) covering the layer",
)
PARTIAL = Rule(
    "exclusion.partial-shards",
    "the exclusion list names some but not all shards of a fused layer",
    "exclude all members of the fused group (q/k/v, gate/up, all experts) or none",
)
FUSED_MIXED = Rule(
    "exclusion.fused-mixed",
    "members of one fused layer disagree on being quantized",
    "quantize all members of the fused group (q/k/v, gate/up, every expert) alike, or exclude them all",
)
MEMBER_DISAGREE = Rule(
    "exclusion.member-disagree",
    "a pattern matches a fused member by name but not the engine's fused layer",
    "write patterns that match the whole fused layer the same way (e.g. model.layers.0.self_attn.*)",
    Severity.WARNING,
)
CLASS_NAME = Rule(
    "exclusion.class-name",
    "an ignore entry is a class name, which a file-only check cannot resolve",
    "prefer module names or re: patterns in ignore",
    Severity.WARNING,
)

Decider = Callable[[str, Sequence[str], Sequence[str]], Decision]
_QUANTIZED_WEIGHT = ("F8_E4M3", "F8_E5M2", "U8", "I8", "I32")


def decider(ctx: Context) -> Decider | None:
    """The exclusion matcher of this format and engine."""
    if ctx.qcfg.format is Format.MODELOPT:
        matcher = sglang_decision if ctx.engine is Engine.SGLANG else vllm_decision
        if ctx.qcfg.quant_algo != "MIXED_PRECISION":
            return matcher
        listed = list(ctx.qcfg.quantized_layers) if isinstance(ctx.qcfg.quantized_layers, dict) else []

        def mixed(layer: str, shards: Sequence[str], patterns: Sequence[str]) -> Decision:
            by_list = matcher(layer, shards, patterns)
            return by_list if by_list.excluded else mixed_decision(layer, shards, listed)

        return mixed
    if ctx.qcfg.format is Format.COMPRESSED_TENSORS:
        return ct_decision
    return None


def engine_excludes(ctx: Context, module: str) -> bool:
    """Whether the engine leaves the layer holding checkpoint module ``module`` unquantized (memoised)."""
    decide = decider(ctx)
    if decide is None or module not in ctx.engine_layer:
        return False
    layer, shards = ctx.engine_layer[module]
    key = f"exclusion:{layer}"
    if key not in ctx.memo:
        ctx.memo[key] = decide(layer, shards, ctx.qcfg.ignore).excluded
    return bool(ctx.memo[key])


def _is_embedding(module: str) -> bool:
    tail = module.rsplit(".", 1)[-1]
    return "embed" in tail or tail in ("wte", "wpe")


def _weight_quantized(params: dict) -> bool:
    weight = params.get("weight") or params.get("weight_packed") or params.get("gate_up_proj")
    return weight is not None and weight.dtype in _QUANTIZED_WEIGHT


class _CTTargets:
    """compressed-tensors ``targets`` over checkpoint module names; ``Linear`` covers every matrix
    that is not an embedding. Other class names make the answer unknown (None)."""

    def __init__(self, ctx: Context) -> None:
        self.targets = [t for g in ctx.qcfg.ct_groups for t in g.targets]
        self.unknown_class = any(is_class_name(t) and t != "Linear" for t in self.targets)
        self.ignore_classes = any(is_class_name(p) for p in ctx.qcfg.ignore)

    def covers(self, module: str) -> bool | None:
        if any(ct_matches(module, t) for t in self.targets if not is_class_name(t)):
            return True
        if "Linear" in self.targets and not _is_embedding(module):
            return True
        return None if self.unknown_class else False


def _layers(ctx: Context) -> dict[str, tuple[str, ...]]:
    layers: dict[str, tuple[str, ...]] = {}
    for layer, shards in ctx.engine_layer.values():
        layers.setdefault(layer, shards)
    return layers


def _layer_findings(
    ctx: Context, decide: Decider, layer: str, shards: tuple[str, ...], targets: _CTTargets | None
) -> Iterator[Finding]:
    patterns = ctx.qcfg.ignore
    quantized = [is_quantized(ctx.modules.get(s, {})) for s in shards]
    decision = decide(layer, shards, patterns)
    if decision.partial:
        yield PARTIAL.finding(layer, f"{layer}: {decision.reason}; the engine raises 'some but not all shards'")
    if any(quantized) and not all(quantized):
        plain = [s for s, q in zip(shards, quantized, strict=True) if not q]
        yield FUSED_MIXED.finding(
            layer,
            f"{layer} is one GEMM in the engine, but {len(plain)} of its "
            f"{len(shards)} members have no scale tensors: {plain[:4]}",
        )
        return
    if decision.partial:
        return
    if all(quantized) and decision.excluded:
        params = ctx.modules.get(shards[0], {})
        rule = QUANTIZED_EXCLUDED if _weight_quantized(params) else EXCLUDED_HAS_SCALES
        yield rule.finding(layer, f"{layer} has scale tensors but the exclusion list excludes it ({decision.reason})")
    elif not any(quantized) and not decision.excluded:
        covered = targets.covers(shards[0]) if targets is not None else True
        if not covered or (targets is not None and targets.ignore_classes):
            return
        severity = Severity.WARNING if _is_embedding(layer) else None
        yield UNLISTED.finding(
            layer,
            f"{layer} has no scale tensors but no exclusion entry matches it; the "
            "engine will build it as a quantized layer",
            severity=severity,
        )
    elif all(quantized) and targets is not None and targets.covers(shards[0]) is False:
        yield UNTARGETED.finding(layer, f"{layer} is quantized but no config group targets it")
    if len(shards) > 1 and not layer.endswith("experts"):
        member = [decide(s, (s,), patterns).excluded for s in shards]
        if any(m != decision.excluded for m in member):
            by_member = dict(zip(shards, member, strict=True))
            yield MEMBER_DISAGREE.finding(
                layer,
                f"matching member names gives {by_member}, but the engine decides {decision.excluded} for {layer}",
            )


def check(ctx: Context) -> Iterator[Finding]:
    decide = decider(ctx)
    if decide is None:
        return
    targets = _CTTargets(ctx) if ctx.qcfg.format is Format.COMPRESSED_TENSORS else None
    if targets is not None:
        classes = [p for p in ctx.qcfg.ignore if is_class_name(p)]
        if classes:
            yield CLASS_NAME.finding(
                ctx.qcfg.source,
                f"ignore entries {classes} name classes; modules of those classes cannot be identified from the files",
            )
    for layer, shards in sorted(_layers(ctx).items()):
        yield from _layer_findings(ctx, decide, layer, shards, targets)
