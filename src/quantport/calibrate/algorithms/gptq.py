"""GPTQ (Frantar et al., 2022) on one Linear weight, quantized by the format's own codec.

Columns are quantized in turn; each one's error ``(w - q) / [H^-1]_jj`` is spread over the columns not
yet quantized through the upper Cholesky factor of the dampened inverse Hessian, in lazy batches of
``block_size`` columns (the paper's section 3 steps 1-3). With ``act_order`` the columns go in order of
decreasing Hessian diagonal.

Scales and exported weights. A scale unit's bounds (``lo``, ``hi``) are taken when the loop reaches the
unit's first column (group scales), or from the weights before any update (``static_groups``, act-order,
channel and tensor scales). Each unit keeps one *holder* per bound: the element that set it keeps its value
at that moment and is quantized as such (GPTQ's update is exact for any chosen ``q``), every other element
is clamped to the bounds before it is quantized (clamping moves no code). The returned weight holds these
values, so the codec, given it, derives the same scales and codes: the export and the simulation decode
to GPTQ's ``Q`` exactly (:func:`gptq_weight` checks it).

MoE experts: :class:`GptqStep` also runs GPTQ on each expert of the fused experts modules against its own
Hessians (:mod:`.expert_hessians`, :mod:`.gptq_experts`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ...algorithm_options import Algorithm, ExpertGptqPolicy, GptqOptions
from ...arch.experts import ForwardContract
from ...errors import InvalidArgumentError, QuantportError
from ...formats.descriptors import ScaleGranularity
from ...modules.quant_experts import ExpertsQuantizer
from ...schemes import SchemeCodec
from .expert_hessians import ExpertHessianObserver, expert_chunk_size
from .hessian import HessianObserver
from .registry import AlgorithmContext, register, replace_weight

__all__ = ["GptqResult", "GptqStep", "NotPositiveDefiniteError", "gptq_weight", "inverse_hessian_factor"]

logger = logging.getLogger(__name__)

_DAMP_RETRIES = 4


class NotPositiveDefiniteError(QuantportError, RuntimeError):
    """The dampened Hessian has no Cholesky factor even with more dampening (the layer then stays at
    round-to-nearest and is named in the summary)."""


@dataclass(frozen=True, slots=True)
class GptqResult:
    """What GPTQ chose for one weight.

    Attributes:
        weight: ``[out, in]`` in the model dtype: the codec quantizes it to GPTQ's codes and scales.
        dequantized: ``[out, in]`` in the model dtype: ``Q``, what the export decodes to.
        damp: the dampening fraction finally used (raised from the option when the Hessian needed it).
    """

    weight: Tensor
    dequantized: Tensor
    damp: float


def inverse_hessian_factor(hessian: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (fp32), and the ``damp`` used.

    Inputs that never fired (zero diagonal) get diagonal 1, so their columns are rounded without spreading
    error. Dampening is multiplied by 10 up to four times while the factorisation fails.
    """
    h = hessian.float().clone()
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1
    mean = float(diagonal.mean())
    for _ in range(_DAMP_RETRIES + 1):
        dampened = h + torch.eye(h.shape[0], device=h.device) * (damp * mean)
        factor, info = torch.linalg.cholesky_ex(dampened)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, damp
        damp = max(damp * 10, 1e-4)
    raise NotPositiveDefiniteError(f"the Hessian is not positive definite even with dampening {damp / 10:g}")


class _Bounds:
    """Per-row bounds and holders of the scale unit of each column (see the module docstring)."""

    def __init__(self, codec: SchemeCodec, weight: Tensor, weight_amax: Tensor, static: bool) -> None:
        fmt = codec.format
        self.dtype = weight.dtype
        self.symmetric = fmt.symmetric
        self.tensor = fmt.granularity is ScaleGranularity.TENSOR
        grouped = fmt.granularity is ScaleGranularity.GROUP
        self.width = fmt.block_size if grouped else weight.shape[1]
        self.probe_width = fmt.block_size if grouped else max(3, fmt.input_multiple)
        out_features = weight.shape[0]
        units = weight.shape[1] // self.width
        self.lo = torch.zeros(out_features, units)
        self.hi = torch.zeros(out_features, units)
        self.holder_lo = torch.full((out_features, units), -1, dtype=torch.long)
        self.holder_hi = torch.full((out_features, units), -1, dtype=torch.long)
        self.value_lo = torch.zeros(out_features, units)
        self.value_hi = torch.zeros(out_features, units)
        if self.tensor:
            amax = float(weight_amax)
            self.lo.fill_(-amax)
            self.hi.fill_(amax)
        elif static:
            for unit in range(units):
                self.refresh(weight[:, unit * self.width : (unit + 1) * self.width].float(), unit * self.width)

    def refresh(self, values: Tensor, first_column: int) -> None:
        """Set the bounds of the unit starting at ``first_column`` from its current ``values`` ``[out, width]``."""
        unit = first_column // self.width
        values = values.to(self.dtype).float()
        if self.symmetric:
            top, where = values.abs().max(dim=1)
            self.lo[:, unit], self.hi[:, unit] = -top, top
            signed = values.gather(1, where[:, None]).squeeze(1)
            positive = signed >= 0
            self.holder_hi[:, unit] = torch.where(positive, where + first_column, -1)
            self.holder_lo[:, unit] = torch.where(positive, -1, where + first_column)
            self.value_hi[:, unit] = self.value_lo[:, unit] = signed
            return
        low, where_lo = values.min(dim=1)
        high, where_hi = values.max(dim=1)
        self.lo[:, unit], self.hi[:, unit] = low.clamp(max=0), high.clamp(min=0)
        self.holder_lo[:, unit] = torch.where(low < 0, where_lo + first_column, -1)
        self.holder_hi[:, unit] = torch.where(high > 0, where_hi + first_column, -1)
        self.value_lo[:, unit], self.value_hi[:, unit] = low, high

    def exported(self, column: int, w: Tensor) -> Tensor:
        """The value the exported weight holds in ``column`` (model dtype) for the updated column ``w``."""
        unit = column // self.width
        lo, hi = self.lo[:, unit], self.hi[:, unit]
        x = torch.minimum(torch.maximum(w, lo), hi)
        if not self.tensor:
            x = torch.where(self.holder_lo[:, unit] == column, self.value_lo[:, unit], x)
            x = torch.where(self.holder_hi[:, unit] == column, self.value_hi[:, unit], x)
        return x.to(self.dtype)

    def probe(self, column: int, x: Tensor) -> Tensor:
        """A one-unit weight whose first column is ``x`` and whose codec scales are this unit's."""
        unit = column // self.width
        probe = torch.zeros(x.shape[0], self.probe_width, dtype=self.dtype)
        probe[:, 0] = x
        if not self.tensor:
            probe[:, 1] = self.hi[:, unit].to(self.dtype)
            probe[:, 2] = self.lo[:, unit].to(self.dtype)
        return probe


def _check_options(codec: SchemeCodec, weight: Tensor, options: GptqOptions) -> None:
    granularity = codec.format.granularity
    if granularity is ScaleGranularity.BLOCK_2D:
        raise InvalidArgumentError(
            f"gptq does not support {codec.format.name} (2-D block scales); use --algorithm max or mse"
        )
    group = codec.format.block_size if granularity is ScaleGranularity.GROUP else None
    if group is not None and options.block_size % group:
        raise InvalidArgumentError(
            f"gptq block_size {options.block_size} must be a multiple of {codec.format.name}'s group size {group}"
        )


def gptq_weight(
    codec: SchemeCodec, weight: Tensor, weight_amax: Tensor, hessian: Tensor, options: GptqOptions
) -> GptqResult:
    """GPTQ of ``weight`` ``[out, in]`` (model dtype) against ``hessian`` (fp32 ``[in, in]``).

    ``weight_amax`` is the per-tensor amax the codec is given (NVFP4's global scale, FP8's tensor scale).
    Raises :class:`NotPositiveDefiniteError` when the Hessian cannot be factorised.
    """
    _check_options(codec, weight, options)
    n_columns = weight.shape[1]
    static = options.static_groups or options.act_order or codec.format.granularity is not ScaleGranularity.GROUP
    bounds = _Bounds(codec, weight.cpu(), weight_amax.cpu(), static)
    hessian = hessian.float().cpu()
    order = torch.argsort(hessian.diagonal(), descending=True) if options.act_order else torch.arange(n_columns)
    factor, damp = inverse_hessian_factor(hessian[order][:, order], options.damp)
    w = weight.float().cpu()[:, order].clone()
    exported = torch.zeros_like(w)
    quantized = torch.zeros_like(w)
    for start in range(0, n_columns, options.block_size):
        end = min(start + options.block_size, n_columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        inverse = factor[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            if not static and column % bounds.width == 0:
                bounds.refresh(block[:, i : i + bounds.width], column)
            x = bounds.exported(column, block[:, i])
            probe = codec.dequantize_weight(codec.quantize_weight(bounds.probe(column, x), weight_amax), weight.dtype)
            q = probe[:, 0].float()
            exported[:, start + i] = x.float()
            quantized[:, start + i] = q
            errors[:, i] = (block[:, i] - q) / inverse[i, i]
            block[:, i:] -= errors[:, i : i + 1] * inverse[i : i + 1, i:]
        w[:, end:] -= errors @ factor[start:end, end:]
    inverse_order = torch.argsort(order)
    new_weight = exported[:, inverse_order].to(weight.dtype).to(weight.device)
    dequantized = quantized[:, inverse_order].to(weight.dtype).to(weight.device)
    return GptqResult(new_weight, dequantized, damp)


@register(Algorithm.GPTQ)
class GptqStep:
    """``gptq`` on every quantized Linear, with Hessians from the calibration forward (fused groups share one),
    then on the MoE experts (:mod:`.gptq_experts`), one chunk of experts per calibration forward.

    A layer whose input never ran, or whose Hessian cannot be factorised, keeps round-to-nearest, named in
    :attr:`AlgorithmContext.left_at_rtn` (never silently); so does an expert, by the options' policy.
    """

    needs_forward = True

    def __init__(self, context: AlgorithmContext) -> None:
        self.context = context
        options = context.options
        assert isinstance(options, GptqOptions)
        for module in context.layers.values():
            _check_options(context.codec, module.weight, options)
        self.observer = HessianObserver.attach(dict(context.layers), context.groups)
        self.experts = self._experts_to_update(options)
        all_tokens = options.expert_policy is ExpertGptqPolicy.ALL_EXPERTS
        blocks = [q.block for q in self.experts]
        self.expert_observer = ExpertHessianObserver.for_blocks(blocks, all_tokens)
        chunk = expert_chunk_size(blocks, options.expert_chunk, all_tokens)
        most = max((b.num_experts for b in blocks), default=0)
        self.expert_chunks = [range(start, start + chunk) for start in range(0, most, chunk)]
        if self.expert_chunks:
            self.expert_observer.attach(self.expert_chunks[0])

    def _experts_to_update(self, options: GptqOptions) -> list[ExpertsQuantizer]:
        from .gptq_experts import unsupported_layout_reason

        if not options.experts:
            return []
        chosen = []
        for quantizer in self.context.experts:
            _check_options(self.context.codec, quantizer.block.experts.down_proj[0], options)
            reason = unsupported_layout_reason(quantizer)
            if reason is not None:
                self.context.left_at_rtn[quantizer.block.experts_name] = reason
                logger.warning("gptq: %s: %s", quantizer.block.experts_name, reason)
                continue
            dense_routed = quantizer.block.layout.contract is ForwardContract.DENSE_ROUTED
            if options.expert_policy is ExpertGptqPolicy.ALL_EXPERTS and dense_routed:
                raise InvalidArgumentError(
                    f"--gptq-expert-policy all-experts is not available for {quantizer.block.layout.family} experts "
                    "(their module only sees router-scaled inputs); use dampen or rtn"
                )
            chosen.append(quantizer)
        return chosen

    @property
    def forward_passes(self) -> int:
        """Calibration forwards the step needs: one per chunk of experts (at least one)."""
        return max(1, len(self.expert_chunks))

    def stop_observing(self) -> None:
        self.observer.detach()
        self.expert_observer.detach()

    def apply(self) -> None:
        context = self.context
        for name, module in context.quantized_layers().items():
            hessian = self.observer.accumulators[name].hessian()
            if hessian is None:
                context.left_at_rtn[name] = "no calibration token reached it (no Hessian)"
                logger.warning("gptq: %s keeps round-to-nearest: no calibration token reached it", name)
                continue
            weight, amax = module.weight.detach(), module.weight_amax()
            try:
                result = gptq_weight(context.codec, weight, amax, hessian, context.options)
            except NotPositiveDefiniteError as exc:
                context.left_at_rtn[name] = f"Hessian not positive definite ({exc})"
                logger.warning("gptq: %s keeps round-to-nearest: %s", name, exc)
                continue
            decoded = context.codec.dequantize_weight(context.codec.quantize_weight(result.weight, amax), weight.dtype)
            if not torch.equal(decoded, result.dequantized):
                raise RuntimeError(f"gptq: the exported weight of {name} does not decode to GPTQ's choice (a bug)")
            replace_weight(module, result.weight)
        self.observer.accumulators.clear()  # the Hessians are not needed any more
        self._apply_experts()

    def _apply_experts(self) -> None:
        from .gptq_experts import ExpertGptqRecord, gptq_experts

        context, record = self.context, ExpertGptqRecord()
        for index, chunk in enumerate(self.expert_chunks):
            if index > 0:  # the first chunk was observed in the pipeline's calibration forward
                if context.rerun_forward is None:
                    raise RuntimeError("gptq: experts need another calibration forward and none was given (a bug)")
                logger.info(
                    "gptq: calibration forward %d/%d for experts %d-%d",
                    index + 1,
                    len(self.expert_chunks),
                    chunk.start,
                    chunk.stop - 1,
                )
                self.expert_observer.attach(chunk)
                try:
                    context.rerun_forward()
                finally:
                    self.expert_observer.detach()
            for quantizer in self.experts:
                gptq_experts(
                    quantizer, self.expert_observer.modules[quantizer.block.experts_name], context.options, record
                )
            self.expert_observer.clear()
        context.left_at_rtn.update(record.left_at_rtn)
        context.notes.update(record.notes)
        if self.experts:
            logger.info(
                "gptq: %d experts updated, %d left at round-to-nearest, %d with notes",
                record.updated,
                len(record.left_at_rtn),
                len(record.notes),
            )
