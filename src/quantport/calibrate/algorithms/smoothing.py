"""AWQ and SmoothQuant in :func:`quantport.quantize`: scales chosen and folded before the weights are quantized.

:func:`smooth_model` runs one calibration forward on the unquantized model to observe every folding place's
input (:mod:`.input_statistics`), chooses each place's scale (:mod:`.awq` or :mod:`.smoothquant`) and folds
it (:mod:`.folding`). Folding keeps the model's function, so the places are independent and one forward is
enough. The quantizer then sees an ordinary model whose weights carry the scales: export writes no new
tensor. The step registered here applies what comes after: AWQ's clipping search and, for ``awq+gptq`` /
``smoothquant+gptq``, GPTQ on the scaled weights.

MoE: the experts (and shared experts) of a block read the MLP norm's output, so one scale serves them all;
the router reads it too and gets the scale in its columns. Routing decisions of the sampled calibration
tokens are recomputed with the folded router (rounded to its dtype) and the fraction whose top-k set
changed is reported. Experts' down_proj inputs are not scaled (each expert's intermediate is its own, and
the experts module is not observed per expert).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ...algorithm_options import Algorithm, AwqOptions, SmoothingOptions, SmoothQuantOptions
from ...arch.experts import MoEBlock
from ...schemes import SchemeCodec
from ..loop import model_inputs, run_calibration
from .awq import Reader, Scorer, awq_clipped_weight, awq_scale, clip_supported, groups_fit
from .block_scorer import GatedMlpScorer, gated_readers
from .expert_down import awq_expert_down, clip_experts
from .folding import (
    FoldTarget,
    SourceKind,
    expand_heads,
    find_fold_targets,
    fold_expert_down,
    fold_scale,
    reduce_heads,
)
from .gptq import GptqStep
from .input_statistics import InputStatistics, InputStatisticsObserver
from .registry import AlgorithmContext, register, replace_weight
from .routing import Routing, route
from .smoothquant import smoothquant_scale

__all__ = ["SmoothedStep", "SmoothingReport", "smooth_model"]

logger = logging.getLogger(__name__)


@dataclass
class SmoothingReport:
    """What :func:`smooth_model` did.

    Attributes:
        folded: folding place -> AWQ's chosen strength (None: scale 1 won) or SmoothQuant's alpha.
        skipped: folding place -> why it was not folded.
        routing_flips: MoE norm -> fraction of sampled calibration tokens whose top-k experts changed.
        output_change: max |logits after - before| / max |logits before| on the first calibration batch,
            unquantized (folding alone; bf16 rounding of the scaled weights).
        inputs: quantized Linear -> sampled inputs as it sees them after folding (AWQ clipping only).
        clipped_experts: experts module -> how many of its experts AWQ's clipping search reached.
        expert_inputs: MoE norm -> its sampled outputs after folding (AWQ clipping of the experts, done
            after ``output_change`` is measured: clipping changes the function, folding does not).
    """

    folded: dict[str, float | None] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    routing_flips: dict[str, float] = field(default_factory=dict)
    output_change: float = 0.0
    inputs: dict[str, Tensor] = field(default_factory=dict)
    clipped_experts: dict[str, int] = field(default_factory=dict)
    expert_inputs: dict[str, Tensor] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (without the sampled inputs)."""
        return {
            "folded": dict(self.folded),
            "skipped": dict(self.skipped),
            "routing_flips": dict(self.routing_flips),
            "output_change": self.output_change,
            "clipped_experts": dict(self.clipped_experts),
        }


def _first_output(model: nn.Module, batch: Any) -> Tensor:
    device = next(model.parameters()).device
    language_model = getattr(model, "language_model", None)
    target = language_model if isinstance(language_model, nn.Module) else model
    with torch.no_grad():
        out = target(**model_inputs(batch, device), use_cache=False)
    logits = getattr(out, "logits", None)
    return (logits if logits is not None else out[0]).detach().float()


def _plan(
    targets: list[FoldTarget], options: SmoothingOptions, quantized: set[str], experts: set[str]
) -> list[FoldTarget]:
    planned = []
    for target in targets:
        if target.kind is SourceKind.VALUE_HEADS and not options.fold_o_proj:
            continue
        if target.kind is SourceKind.LINEAR and not options.fold_down_proj:
            continue
        has_experts = target.experts is not None and target.experts.experts_name in experts
        if target.skipped is None and not has_experts and not any(n in quantized for n in target.linears):
            target.skipped = "none of its readers is quantized"
        planned.append(target)
    return planned


def _routing(target: FoldTarget, modules: dict[str, nn.Module], sample: Tensor) -> Tensor | None:
    """``[n, top_k]`` experts of the sampled tokens by the router's logits (None without a router)."""
    if not target.compensated or target.top_k < 1:
        return None
    router = modules[target.compensated[0]]
    logits = sample.to(router.weight.dtype) @ router.weight.detach().T
    return logits.float().topk(min(target.top_k, logits.shape[-1]), dim=-1).indices.sort(dim=-1).values


def _readers(
    target: FoldTarget, modules: dict[str, nn.Module], sample: Tensor, quantized: set[str], experts: set[str]
) -> list[Reader]:
    readers = [Reader(modules[n].weight.detach()) for n in target.linears if n in quantized]
    block = target.experts
    if block is None or block.experts_name not in experts:
        return readers
    routing = _expert_routing(target, modules, sample)
    gate_up = block.experts.gate_up_proj.detach()
    gates, ups = block.layout.gate(gate_up), block.layout.up(gate_up)
    for expert in range(block.num_experts):
        rows, weights = (None, None) if routing is None else routing.tokens(expert)
        readers += [Reader(gates[expert], rows, weights), Reader(ups[expert], rows, weights)]
    return readers


def _block_scorer(
    target: FoldTarget,
    modules: dict[str, nn.Module],
    sample: Tensor,
    codec: SchemeCodec,
    options: SmoothingOptions,
    quantized: set[str],
    experts: set[str],
) -> GatedMlpScorer | None:
    """AWQ with ``block_score`` on an MLP norm: the scorer of the block's output (None: score the Linears)."""
    if not isinstance(options, AwqOptions) or not options.block_score or target.kind is not SourceKind.NORM:
        return None
    linears = [n for n in target.linears if n in quantized]
    block = target.experts if _experts_quantized(target, experts) else None
    if block is None and not linears:
        return None
    readers = gated_readers(linears, modules, block, _expert_routing(target, modules, sample))
    return None if readers is None else GatedMlpScorer(codec, sample, readers)


def _experts_quantized(target: FoldTarget, experts: set[str]) -> bool:
    return target.experts is not None and target.experts.experts_name in experts


def _expert_routing(target: FoldTarget, modules: dict[str, nn.Module], sample: Tensor) -> Routing | None:
    """The routing (experts and weights) of the sampled tokens by the block's router (None without one)."""
    if target.experts is None or not target.compensated or target.top_k < 1:
        return None
    return route(modules[target.compensated[0]], target.experts.layout.contract, sample, target.top_k)


NOT_RECOMPUTABLE = "the experts have biases or no act_fn: their intermediates are not recomputed"


def _recomputable(block: MoEBlock) -> bool:
    """Whether the experts' intermediates can be recomputed from their inputs (no biases, an ``act_fn``)."""
    return not block.layout.has_bias and callable(getattr(block.experts, "act_fn", None))


def _clip_experts(
    target: FoldTarget,
    modules: dict[str, nn.Module],
    sample: Tensor,
    codec: SchemeCodec,
    options: AwqOptions,
    report: SmoothingReport,
) -> None:
    """AWQ's clipping search on the experts of ``target``'s block (after their scales are folded)."""
    block = target.experts
    assert block is not None
    name = f"{block.experts_name}.clip"
    down = block.layout.down(block.experts.down_proj)
    if not clip_supported(codec) or not all(groups_fit(codec, n) for n in down.shape[-2:]):
        report.skipped[name] = f"{codec.format.name} has no group or channel scales that fit the experts"
        return
    if not _recomputable(block):
        report.skipped[name] = NOT_RECOMPUTABLE
        return
    routing = _expert_routing(target, modules, sample)
    if routing is None:
        report.skipped[name] = "no router to tell which sampled tokens reach each expert"
        return
    report.clipped_experts[block.experts_name] = clip_experts(codec, block, routing, sample, options)


def _fold_expert_down(
    target: FoldTarget,
    modules: dict[str, nn.Module],
    sample: Tensor,
    codec: SchemeCodec,
    options: AwqOptions,
    report: SmoothingReport,
) -> None:
    """AWQ on every expert's down_proj input of ``target``'s block (``sample``: the block's inputs as the
    folded model sees them), folded into the experts' up rows."""
    block = target.experts
    assert block is not None
    name = f"{block.experts_name}.down_proj"
    if not _recomputable(block):
        report.skipped[name] = NOT_RECOMPUTABLE
        return
    inter = block.layout.down(block.experts.down_proj).shape[-1]
    if not groups_fit(codec, inter):
        report.skipped[name] = f"the experts' intermediate size {inter} does not split into the recipe's groups"
        return
    routing = _expert_routing(target, modules, sample)
    if routing is None:
        report.skipped[name] = "no router to tell which sampled tokens reach each expert"
        return
    chosen = awq_expert_down(codec, block, routing, sample, options)
    fold_expert_down(block, chosen.scales)
    leaf = block.layout.leaf_names[2]
    for expert, choice in enumerate(chosen.choices):
        key = f"{block.experts_name}.{expert}.{leaf}"
        if choice is None:
            report.skipped[key] = "no sampled calibration token reached the expert"
        else:
            report.folded[key] = choice.alpha


def _choose(
    target: FoldTarget,
    stats: InputStatistics,
    sample: Tensor,
    readers: list[Reader],
    codec: SchemeCodec,
    options: SmoothingOptions,
    scorer: Scorer | None = None,
) -> tuple[Tensor, float | None]:
    heads = target.kind is SourceKind.VALUE_HEADS
    mean: Callable[[Tensor], Tensor] = (lambda t: reduce_heads(t, target, "mean")) if heads else (lambda t: t)
    amax: Callable[[Tensor], Tensor] = (lambda t: reduce_heads(t, target, "amax")) if heads else (lambda t: t)
    if isinstance(options, AwqOptions):
        expand: Callable[[Tensor], Tensor] = (lambda s: expand_heads(s, target)) if heads else (lambda s: s)
        choice = awq_scale(codec, sample, mean(stats.abs_mean()), readers, options, mean, expand, scorer)
        return choice.scale, choice.alpha
    scale = smoothquant_scale(amax(stats.abs_max), [r.weight for r in readers], options.alpha, amax)
    return scale, options.alpha


def _fold_target(
    model: nn.Module,
    modules: dict[str, nn.Module],
    target: FoldTarget,
    stats: InputStatistics,
    sample: Tensor,
    codec: SchemeCodec,
    options: SmoothingOptions,
    quantized: set[str],
    experts: set[str],
    report: SmoothingReport,
) -> None:
    """Choose and fold ``target``'s scale (and, for AWQ on a MoE block, its experts' down_proj scales)."""
    readers = _readers(target, modules, sample, quantized, experts)
    scale, alpha = _choose(
        target,
        stats,
        sample,
        readers,
        codec,
        options,
        _block_scorer(target, modules, sample, codec, options, quantized, experts),
    )
    routed = _routing(target, modules, sample)
    fold_scale(model, target, scale)
    column = expand_heads(scale, target) if target.kind is SourceKind.VALUE_HEADS else scale
    scaled = (sample.float() / column).to(sample.dtype)
    if routed is not None:
        after = _routing(target, modules, scaled)
        report.routing_flips[target.name] = float((after != routed).any(dim=-1).float().mean())
    if isinstance(options, AwqOptions) and options.clip:
        for name in target.linears:
            if name in quantized:
                report.inputs[name] = scaled
    report.folded[target.name] = alpha
    if isinstance(options, AwqOptions) and _experts_quantized(target, experts):
        if options.fold_expert_down:
            _fold_expert_down(target, modules, scaled, codec, options, report)
        if options.clip:
            report.expert_inputs[target.name] = scaled


def smooth_model(
    model: nn.Module,
    codec: SchemeCodec,
    options: SmoothingOptions,
    batches: list[Any],
    quantized: set[str],
    experts: set[str],
    *,
    progress: bool = True,
) -> SmoothingReport:
    """Choose and fold the scales of ``options`` into ``model`` (unquantized, changed in place).

    Args:
        quantized: names of the Linear layers that will be quantized (the readers scored or measured).
        experts: names of the experts modules that will be quantized.
        batches: the calibration batches (run once here; the caller may reuse them).
    """
    report = SmoothingReport()
    targets = _plan(find_fold_targets(model), options, quantized, experts)
    for target in targets:
        if target.skipped is not None:
            report.skipped[target.name] = target.skipped
    active = [t for t in targets if t.skipped is None]
    outputs = [t.observed for t in active if t.observes_output]
    inputs = [t.observed for t in active if not t.observes_output]
    before = _first_output(model, batches[0]) if batches else None
    observer = InputStatisticsObserver.attach(model, outputs, inputs, options.max_tokens)
    try:
        run_calibration(model, batches, progress=progress)
    finally:
        observer.detach()
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    with torch.no_grad():
        for target in active:
            stats = observer.statistics[target.observed]
            if stats.tokens == 0:
                report.skipped[target.name] = "no calibration token reached it"
                continue
            sample = stats.sample().to(device)
            _fold_target(model, modules, target, stats, sample, codec, options, quantized, experts, report)
    if before is not None:
        after_out = _first_output(model, batches[0])
        report.output_change = float((after_out - before).abs().max() / before.abs().max().clamp(min=1e-12))
    with torch.no_grad():
        for target in active:
            scaled = report.expert_inputs.pop(target.name, None)
            if scaled is not None and isinstance(options, AwqOptions):
                _clip_experts(target, modules, scaled, codec, options, report)
    flips = max(report.routing_flips.values(), default=0.0)
    logger.info(
        "%s: folded %d scale(s), skipped %d; output change %.2e (relative); routing flips up to %.2f%% of tokens",
        options.name,
        len(report.folded),
        len(report.skipped),
        report.output_change,
        100 * flips,
    )
    return report


@register(Algorithm.AWQ)
@register(Algorithm.SMOOTHQUANT)
class SmoothedStep:
    """After folding (done before quantization by :func:`smooth_model`): AWQ's clipping search, then GPTQ for
    the combinations."""

    def __init__(self, context: AlgorithmContext) -> None:
        self.context = context
        options = context.options
        assert isinstance(options, AwqOptions | SmoothQuantOptions)
        self.inner = GptqStep(replace(context, options=options.then)) if options.then is not None else None
        self.needs_forward = self.inner is not None and self.inner.needs_forward

    def stop_observing(self) -> None:
        if self.inner is not None:
            self.inner.stop_observing()

    def apply(self) -> None:
        options, smoothing = self.context.options, self.context.smoothing
        if isinstance(options, AwqOptions) and options.clip and smoothing is not None:
            self._clip(options, smoothing)
        if self.inner is not None:
            self.inner.apply()

    def _clip(self, options: AwqOptions, smoothing: SmoothingReport) -> None:
        codec = self.context.codec
        if not clip_supported(codec):
            logger.warning("awq: clipping search skipped: %s has no group or channel scales", codec.format.name)
            return
        for name, module in self.context.quantized_layers().items():
            x = smoothing.inputs.get(name)
            if x is None:
                continue
            weight = module.weight.detach()
            replace_weight(
                module, awq_clipped_weight(codec, weight, module.weight_amax(), x.to(weight.device), options)
            )
        smoothing.inputs.clear()
