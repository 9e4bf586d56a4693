"""quantize(): wrap, calibrate, unify shared-input groups. The model is changed in place."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .algorithm_options import Algorithm, AlgorithmOptions, AwqOptions, SmoothQuantOptions, algorithm_options
from .arch.experts import ForwardContract, MoEBlock
from .arch.fused_groups import find_attention_modules, find_shared_input_groups
from .calibrate import calibration_batches, run_calibration
from .calibrate.algorithms import finish_algorithm, start_algorithm
from .calibrate.loop import auto_batch_size
from .calibrate.moe_policy import MoECalibration, MoEInputScales, apply_input_policy, check_input_policy
from .distributed import (
    agree_on_statistics,
    agreed_batch_size,
    all_ranks_agree,
    in_distributed_run,
    progress_here,
    rank_share,
)
from .errors import CalibrationDataError, InvalidArgumentError, InvalidWeightsError
from .input_checks import check_finite_statistics, refuse_quantized
from .memory.mapped_weights import MappedWeights
from .modules.expert_weights import expert_weight_amax
from .modules.kv_cache import install_kv_quantizer
from .modules.observe import update_amax
from .modules.quant_experts import ExpertsQuantizer, install_experts_quantizer
from .modules.quant_linear import QuantLinear, QuantMode
from .quantize_plan import check_plan, plan_experts, plan_layers
from .recipes import KVCacheFormat, QuantRecipe, get_recipe
from .report.coverage import ExpertCoverage, LayerCoverage
from .schemes import SchemeCodec, codec_for
from .sequential.attached import layer_store_of
from .state import QuantizationState, attach_state, set_mode

__all__ = ["quantize", "simulate"]

logger = logging.getLogger(__name__)


def _weight_amax_checked(
    model: nn.Module, names: list[str], blocks: list[MoEBlock], mapped: MappedWeights
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """fp32 amax of every weight to quantize (Linear name -> 0-d; experts name -> projection -> [E]),
    in one pass that also finds NaN / inf weights (their amax is not finite)."""
    modules = dict(model.named_modules())
    bad = []
    amax = {}
    for name in names:
        amax[name] = update_amax(None, modules[name].weight)
        if not torch.isfinite(amax[name]):
            bad.append(f"{name}.weight")
        mapped.release_module(modules[name])
    experts_amax = {}
    for block in blocks:
        experts_amax[block.experts_name] = expert_weight_amax(block)
        for projection, values in experts_amax[block.experts_name].items():
            if not torch.isfinite(values).all():
                bad.append(f"{block.experts_name}.{projection}_proj")
        mapped.release_module(block.experts)
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise InvalidWeightsError(
            f"{len(bad)} weight tensor(s) contain NaN or infinite values ({shown}); the checkpoint is "
            "corrupt or was saved after a diverged training step. Fix the weights, or exclude those "
            "layers with --exclude PATTERN."
        )
    return amax, experts_amax


def _calibration_data(
    model: nn.Module, calib_data: Iterable[Any] | None, options: dict[str, Any], *, whole: bool = True
) -> Iterable[Any]:
    from .calibration_sources import CalibrationData

    if calib_data is not None and not isinstance(calib_data, CalibrationData):
        return calib_data
    tokenizer = options.get("tokenizer")
    if tokenizer is None:
        from transformers import AutoTokenizer

        source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as exc:  # noqa: BLE001  (any loader failure means the same to the user)
            raise CalibrationDataError(
                f"no calibration data given and no tokenizer found for {source!r} ({exc}); pass "
                "calib_data=[input_ids, ...] or tokenizer=..."
            ) from exc
    seq_len = options.get("calib_seq_len", 512)
    batch_size = options.get("batch_size", 8)
    if batch_size == "auto":  # fill the GPU: measured on one probe forward of the whole model (else 8)
        batch_size = agreed_batch_size(auto_batch_size(model, seq_len)) if whole else 8  # torchrun: smallest rank's
    if isinstance(calib_data, CalibrationData):  # data sets, mixed and shuffled (calibrate/mixing.py)
        from .calibrate.mixing import dataset_batches

        samples = options.get("calib_samples", 64)
        return dataset_batches(tokenizer, calib_data, samples=samples, seq_len=seq_len, batch_size=batch_size)
    return calibration_batches(
        tokenizer,
        text_path=options.get("calib_text"),
        samples=options.get("calib_samples", 64),
        seq_len=seq_len,
        batch_size=batch_size,
    )


def _unify_groups(model: nn.Module, state: QuantizationState, codec: SchemeCodec, *, within: str = "") -> None:
    """One input amax and one weight amax per shared-input group (engines fuse them); ``within`` a module
    prefix: only that module's groups, not recorded in the state (the whole model's pass records them)."""
    modules = dict(model.named_modules())
    for group in find_shared_input_groups(model):
        members = [modules[m] for m in group.members]
        if not all(isinstance(m, QuantLinear) for m in members) or not group.members[0].startswith(within):
            continue
        if not within:
            state.groups.append(group)
        if codec.static_input_scale:
            shared_input = torch.stack([m.input_amax for m in members]).amax()
            for m in members:
                m.input_amax = shared_input
        if codec.shared_weight_amax:
            shared_weight = torch.stack([m.weight_amax() for m in members]).amax()
            for m in members:
                m.shared_weight_amax = shared_weight


def _allow_reruns(model: nn.Module, step: Any, batches: Iterable[Any]) -> Iterable[Any]:
    """Let an algorithm that observes in several forwards (GPTQ's chunks of experts) run the batches again."""
    if getattr(step, "forward_passes", 1) <= 1:
        return batches
    kept = batches if isinstance(batches, list | tuple) else list(batches)
    step.context.rerun_forward = lambda: run_calibration(model, kept, progress=False)
    return kept


def _drop_uncalibrated(model: nn.Module, state: QuantizationState, *, within: str = "") -> None:
    for name, module in model.named_modules():
        if not name.startswith(within):
            continue
        if isinstance(module, QuantLinear) and module.codec.static_input_scale and module.input_amax is None:
            module.revert()
            state.quantized.remove(name)
            state.excluded[name] = "never ran during calibration (no input statistics)"
            logger.warning("leaving %s unquantized: it never ran during calibration", name)


def _finish_experts(quantizers: list[ExpertsQuantizer], state: QuantizationState, options: dict[str, Any]) -> None:
    policy = MoEInputScales(options.get("moe_input_scales", MoEInputScales.SHARED))
    calibration = MoECalibration(options.get("moe_calib", MoECalibration.ROUTED))
    coverage = ExpertCoverage(policy.value, calibration.value)
    for quantizer in quantizers:
        observed = {p: tuple(a.tolist()) for p, a in quantizer.input_amax.items()}  # before the policy fills gaps
        if quantizer.codec.static_input_scale:
            apply_input_policy(quantizer, policy)
        coverage.layers.append(LayerCoverage(quantizer.block.name, tuple(quantizer.tokens.tolist()), observed))
    state.coverage = coverage if state.calibration_tokens else None


def _install_experts(
    blocks: list[MoEBlock],
    codec: SchemeCodec,
    options: dict[str, Any],
    weight_amax: dict[str, dict[str, torch.Tensor]],
) -> list[ExpertsQuantizer]:
    calibration = MoECalibration(options.get("moe_calib", MoECalibration.ROUTED))
    policy = MoEInputScales(options.get("moe_input_scales", MoEInputScales.SHARED))  # validate early
    quantizers = []
    for block in blocks:
        if codec.static_input_scale:
            check_input_policy(block.layout, policy)
        quantizer = install_experts_quantizer(block, codec, weight_amax[block.experts_name])
        if calibration is MoECalibration.ALL_EXPERTS:
            if block.layout.contract is not ForwardContract.TOP_K:
                raise InvalidArgumentError(
                    f"--moe-calib all-experts is not available for {block.layout.family} experts (their module "
                    "only sees router-scaled inputs); use the default routed calibration"
                )
            quantizer.all_experts_statistics = True
        quantizers.append(quantizer)
    return quantizers


def _needs_forward(codec: SchemeCodec, state: QuantizationState, observes: bool, blocks, calib_data) -> bool:
    """Weight-only recipes need no forward, except for an algorithm that observes inputs, or to report expert
    coverage when data was given."""
    return bool(codec.static_input_scale or state.kv_modules or observes or (blocks and calib_data is not None))


class _Attach:
    """Attaches the quantizers to some of the planned modules (all of them, or one decoder layer's)."""

    def __init__(
        self, model: nn.Module, codec: SchemeCodec, options: dict[str, Any], mapped: MappedWeights | None = None
    ):
        self.model = model
        self.codec = codec
        self.options = options
        self.mapped = mapped or MappedWeights.disabled()

    def __call__(self, names: list[str], blocks: list[MoEBlock], amax=None) -> list[ExpertsQuantizer]:
        """``amax``: (Linear -> weight amax, experts -> projection -> amax) saved by an earlier run (else computed)."""
        weight_amax, experts_amax = amax or _weight_amax_checked(self.model, names, blocks, self.mapped)
        modules = dict(self.model.named_modules())
        for name in names:
            QuantLinear.convert(modules[name], self.codec, weight_amax[name])
        return _install_experts(blocks, self.codec, self.options, experts_amax)


def _install_kv_quantizers(model: nn.Module, state: QuantizationState) -> None:
    if state.recipe.kv_cache is not KVCacheFormat.FP8:
        return
    for name, attention in find_attention_modules(model):
        install_kv_quantizer(attention)
        state.kv_modules.append(name)
    if not state.kv_modules:
        raise InvalidArgumentError(
            "--kv-cache fp8 was asked for, but the model has no attention with k_proj/v_proj; quantize without "
            "--kv-cache"
        )


def _quantize_layer_by_layer(
    model: nn.Module,
    store,
    names: list[str],
    blocks: list[MoEBlock],
    codec: SchemeCodec,
    state: QuantizationState,
    algorithm,
    calib_data: Iterable[Any] | None,
    options: dict[str, Any],
) -> list[ExpertsQuantizer]:
    """A model opened with :func:`quantport.sequential.open_layer_by_layer`: one decoder layer at a time."""
    from .sequential.calibrate import Propagation, quantize_layer_by_layer

    if in_distributed_run() and options.get("resume_dir") is not None:
        raise InvalidArgumentError("--resume does not run under torchrun yet; launch it as one process")
    if algorithm.algorithm is not Algorithm.MAX:
        raise InvalidArgumentError(
            f"--algorithm {algorithm.algorithm.value} does not run layer by layer yet; use --algorithm max "
            "with --sequential, or quantize the model whole"
        )
    forward = _needs_forward(codec, state, False, blocks, calib_data)
    batches = rank_share(_calibration_data(model, calib_data, options, whole=False)) if forward else None  # torchrun
    experts = quantize_layer_by_layer(
        model,
        store,
        names,
        blocks,
        _Attach(model, codec, options),
        batches,
        state,
        progress=options.get("progress", True),
        resume_dir=options.get("resume_dir"),
        propagate=Propagation(options.get("propagate", Propagation.UNQUANTIZED)),
        finish_layer=_FinishLayer(model, state, codec, options),
    )
    if forward:
        check_finite_statistics(model)
        _drop_uncalibrated(model, state)
    return experts


class _FinishLayer:
    """The end of calibration for one decoder layer, so that it can run quantized (quantized propagation):
    uncalibrated Linears dropped, experts input scales filled by the policy, shared-input groups unified. The
    whole model's pass at the end repeats them (same values) and records them in the state."""

    def __init__(self, model: nn.Module, state: QuantizationState, codec: SchemeCodec, options: dict[str, Any]):
        self.model, self.state, self.codec = model, state, codec
        self.policy = MoEInputScales(options.get("moe_input_scales", MoEInputScales.SHARED))

    def __call__(self, prefix: str, experts: list[ExpertsQuantizer]) -> None:
        _drop_uncalibrated(self.model, self.state, within=prefix)
        if self.codec.static_input_scale:
            for quantizer in experts:
                apply_input_policy(quantizer, self.policy)
        _unify_groups(self.model, self.state, self.codec, within=prefix)


def _quantize_whole(
    model: nn.Module,
    names: list[str],
    blocks: list[MoEBlock],
    codec: SchemeCodec,
    state: QuantizationState,
    algorithm,
    calib_data: Iterable[Any] | None,
    options: dict[str, Any],
    mapped: MappedWeights,
):
    """AWQ / SmoothQuant scales folded, every quantizer attached, then one calibration forward of the whole model."""
    smoothing, calib_data = _fold_scales(model, codec, algorithm, calib_data, names, blocks, options)
    experts = _Attach(model, codec, options, mapped)(names, blocks)
    step = start_algorithm(model, codec, algorithm, smoothing)  # hooks the Linears when the algorithm observes inputs
    if _needs_forward(codec, state, step.needs_forward, experts, calib_data):
        batches = rank_share(_calibration_data(model, calib_data, options))  # torchrun: batch i on rank i % N
        batches = _allow_reruns(model, step, batches)
        set_mode(model, QuantMode.CALIBRATE)
        hooks = mapped.release_after_forward(model)
        try:
            progress = progress_here(options.get("progress", True))
            tokens = run_calibration(model, batches, progress=progress, empty_share_ok=in_distributed_run())
        finally:
            set_mode(model, QuantMode.OFF)
            step.stop_observing()
            for hook in hooks:
                hook.remove()
        state.calibration_tokens = agree_on_statistics(model, step, tokens)  # torchrun: reduced over ranks
        if not in_distributed_run():  # torchrun: each rank checked its own before the reduction (a MAX of finite)
            check_finite_statistics(model)  # once, after the loop: no host synchronisation per batch
        _drop_uncalibrated(model, state)
    return experts, step


def _fold_scales(
    model: nn.Module,
    codec: SchemeCodec,
    algorithm: AlgorithmOptions,
    calib_data: Iterable[Any] | None,
    names: list[str],
    blocks: list[MoEBlock],
    options: dict[str, Any],
) -> tuple[Any, Iterable[Any] | None]:
    """AWQ / SmoothQuant: scales folded into the model before any weight is measured (their report, and the
    calibration batches as a list, reused by the calibration forward); other algorithms: nothing."""
    if not isinstance(algorithm, AwqOptions | SmoothQuantOptions):
        return None, calib_data
    from .calibrate.algorithms.smoothing import smooth_model

    batches = list(_calibration_data(model, calib_data, options))
    experts = {b.experts_name for b in blocks}
    progress = options.get("progress", True)
    return smooth_model(model, codec, algorithm, batches, set(names), experts, progress=progress), batches


@all_ranks_agree  # under torchrun: one rank's failure stops every rank
def quantize(
    model: nn.Module,
    recipe: str | QuantRecipe,
    calib_data: Iterable[Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Quantize ``model`` in place with ``recipe`` and return it.

    Args:
        model: a Hugging Face causal LM (transformers 5).
        recipe: a preset name (see :data:`quantport.PRESETS`) or a :class:`QuantRecipe`.
        calib_data: iterable of ``input_ids`` tensors ``[B, T]`` or dicts of model inputs, or a
            :class:`quantport.calibration_sources.CalibrationData` (data sets, read with the model's
            tokenizer and chat template). When None and the recipe needs calibration, the bundled
            English text is tokenized with the model's tokenizer.
        **options: ``exclude`` (extra patterns), ``kv_cache`` ("fp8"), ``tokenizer``, ``calib_text``
            (path), ``calib_samples`` (64), ``calib_seq_len`` (512), ``batch_size`` (8, or "auto":
            as many sequences as fill the free GPU memory),
            ``moe_input_scales`` ("shared" | "per-expert"), ``moe_calib`` ("routed" | "all-experts"),
            ``release_weights`` (True: drop memory-mapped weights from memory once a layer is done with
            them, see :mod:`quantport.memory.mapped_weights`), ``format`` (the checkpoint format the
            model will be exported to, when the recipe's numerics differ per format, e.g.
            ``"compressed-tensors"`` for ``nvfp4``; a form known not to load in that format's engine is then
            refused here, before calibration), ``allow_check_errors`` (False: True lets such a form through
            with a warning, as ``export(..., allow_check_errors=True)``), ``progress`` (True),
            ``algorithm`` ("max" | "mse" | "gptq" | "awq" | "smoothquant" | "awq+gptq" | "smoothquant+gptq", an
            :class:`quantport.algorithm_options.Algorithm`, or its typed options such as
            ``GptqOptions(act_order=True)`` or ``AwqOptions(clip=True)``; default "max": round to nearest),
            ``resume_dir`` (a model opened layer by layer: save the progress there as layers finish, and go on
            from an interrupted run's progress found there; :mod:`quantport.sequential.resume`), ``propagate``
            (layer by layer: "unquantized", the default, gives each layer the full-precision outputs of the one
            before, as a whole-model forward does; "quantized" gives it the simulated quantized outputs).
    """
    unknown = set(options) - {
        "exclude",
        "kv_cache",
        "tokenizer",
        "calib_text",
        "calib_samples",
        "calib_seq_len",
        "batch_size",
        "moe_input_scales",
        "moe_calib",
        "release_weights",
        "format",
        "progress",
        "allow_check_errors",
        "algorithm",
        "resume_dir",
        "propagate",
    }
    if unknown:
        raise TypeError(f"unknown quantize option(s): {', '.join(sorted(unknown))}")
    refuse_quantized(model)
    algorithm = algorithm_options(options.get("algorithm"))
    patterns = options.get("exclude") or ()
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    if options.get("format") is not None:
        from .export.targets import recipe_for_format

        recipe = recipe_for_format(recipe, options["format"])
    recipe = get_recipe(recipe).with_options(kv_cache=options.get("kv_cache"), extra_exclude=patterns)
    codec = codec_for(recipe.scheme)
    state = QuantizationState(recipe=recipe)
    names = plan_layers(model, recipe, codec, state)
    blocks = plan_experts(model, recipe, codec, state)
    check_plan(model, names, blocks, state, patterns)
    if options.get("format") is not None:  # a form known not to load is refused before calibration
        from .export.self_check import refuse_known_failure

        refuse_known_failure(
            model,
            recipe,
            options["format"],
            experts_quantized=bool(blocks),
            allow_check_errors=options.get("allow_check_errors", False),
        )
    _install_kv_quantizers(model, state)  # before any forward: it sets the attention implementation
    state.quantized = names
    state.experts = [b.experts_name for b in blocks]
    store = layer_store_of(model)
    step = mapped = None
    if store is not None:
        experts = _quantize_layer_by_layer(model, store, names, blocks, codec, state, algorithm, calib_data, options)
    else:
        if options.get("resume_dir") is not None or options.get("propagate", "unquantized") != "unquantized":
            raise InvalidArgumentError(
                "resume_dir and propagate work layer by layer: open the model with "
                "quantport.sequential.open_layer_by_layer"
            )
        mapped = MappedWeights() if options.get("release_weights", True) else MappedWeights.disabled()
        experts, step = _quantize_whole(model, names, blocks, codec, state, algorithm, calib_data, options, mapped)
    _finish_experts(experts, state, options)
    _unify_groups(model, state, codec)
    if step is not None:
        finish_algorithm(step, state)
        mapped.release_all()
    attach_state(model, state)
    logger.info("quantized %d Linear layers, %d left unquantized", len(state.quantized), len(state.excluded))
    return model


@contextmanager
def simulate(model: nn.Module) -> Iterator[nn.Module]:
    """Within ``with quantport.simulate(model):``, forward passes compute what the engine computes
    (fake-quantized weights, activations and KV cache); the model is back to full precision after."""
    set_mode(model, QuantMode.SIMULATE)
    try:
        yield model
    finally:
        set_mode(model, QuantMode.OFF)
