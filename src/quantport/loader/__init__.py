"""``quantport.load``: read a quantized checkpoint back into a dense Hugging Face model.

The model is built from the checkpoint's ``config.json`` in the stored dtype, and every parameter is
filled from the checkpoint: quantized weights are dequantized with the scheme codecs (so a checkpoint
quantport wrote decodes to exactly the weights its simulation used), MoE experts are re-fused into
the model's 3-D parameters as their :class:`~quantport.arch.experts.ExpertLayout` says, and everything
else is copied as stored. With ``simulate_activations=True`` the dense Linear layers also see their
input as the engine quantizes it (stored ``input_scale`` or dynamic), and an FP8 KV cache is simulated
with the stored ``k_scale`` / ``v_scale``; quantized MoE experts compute as the engine does through
the experts simulator (:mod:`quantport.modules.expert_simulation`) with their stored per-expert input
scales.

The dialect is detected by :func:`quantport.read.dialect.detect_dialect` (the same function ``check``
and ``inspect`` use), and each dialect has its reader here:

* ModelOpt unified checkpoints (``quant_method: modelopt``, :mod:`.modelopt`), written by quantport or
  nvidia-modelopt 0.47: ``FP8``, ``FP8_PER_CHANNEL_PER_TOKEN``, ``FP8_PB_WO``, ``NVFP4``, ``W4A16_NVFP4``,
  ``MXFP8``, ``W4A16_AWQ``, ``W8A16``, also per layer in ``MIXED_PRECISION``; fused or per-expert experts;
* compressed-tensors (:mod:`.compressed_tensors`), written by quantport or llm-compressor: FP8
  (tensor, channel, 128x128 block), NVFP4, MXFP4, INT8 W8A8, INT4/INT8 group-128 (symmetric or not),
  experts stored per expert;
* gpt-oss's native MXFP4 experts (``quant_method: mxfp4``, :mod:`.mxfp4_native`);
* unquantized checkpoints.

Anything else is a :class:`CheckpointError` naming what is unsupported.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch.experts import MoEBlock, find_moe_blocks
from ..arch.fused_groups import find_attention_modules
from ..arch.hub_names import HubNames
from ..formats.finite import all_finite
from ..loading import resolve_device
from ..modules.expert_simulation import attach_experts_simulator
from ..read.dialect import CheckpointDialect, ModuleRole
from ..read.quant_config import Dialect
from .checkpoint import CheckpointError, TensorStore, read_config, read_dialect
from .experts import ExpertsRecord, load_experts
from .linear import DecodedLinear, DialectDecoder, LinearDecoder, NoQuantizedLinears
from .modelopt import quantizes_activations
from .simulate import install_input_fake_quant, install_kv_scales

__all__ = ["CheckpointError", "ExpertsRecord", "LoadReport", "load", "load_report", "validate_files"]

logger = logging.getLogger(__name__)

_REPORT_ATTR = "quantport_load_report"
MAX_EXPANSION = 8
"""How much larger than its stored bytes a dequantized model may be (4-bit weights in fp32: 8x)."""
_PACKED_DTYPES = (torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass
class LoadReport:
    """What :func:`load` read, kept on the model (see :func:`load_report`).

    Attributes:
        directory: the checkpoint directory.
        dialect: the checkpoint's dialect, quantization config and quantized modules.
        dtype: the model dtype (the stored one).
        dequantized: in-memory module name -> scheme (ModelOpt ``quant_algo`` or quantport scheme) of
            every dequantized Linear.
        experts: how each MoE experts module was stored, with its per-expert input scales.
        activations_simulated: Linear layers whose input is fake-quantized.
        kv_simulated: attention modules with a simulated FP8 KV cache.
        unused_tensors: checkpoint tensors nothing read (logged as a warning).
    """

    directory: Path
    dialect: CheckpointDialect
    dtype: torch.dtype
    dequantized: dict[str, str] = field(default_factory=dict)
    experts: list[ExpertsRecord] = field(default_factory=list)
    activations_simulated: list[str] = field(default_factory=list)
    kv_simulated: list[str] = field(default_factory=list)
    unused_tensors: list[str] = field(default_factory=list)


def _discover_decoders() -> dict[Dialect, LinearDecoder]:
    """The ``DECODER`` of every module of this package, by dialect (unquantized checkpoints: no Linear decoder)."""
    table: dict[Dialect, LinearDecoder] = {Dialect.NONE: NoQuantizedLinears()}
    for module in pkgutil.iter_modules(__path__):
        found = getattr(importlib.import_module(f"{__name__}.{module.name}"), "DECODER", None)
        if isinstance(found, DialectDecoder):
            table[found.dialect] = found.decoder
    return table


_DECODERS: dict[Dialect, LinearDecoder] = _discover_decoders()
"""The Linear decoder of each dialect :func:`load` reads."""


@dataclass
class _Reader:
    model: nn.Module
    names: HubNames
    store: TensorStore
    report: LoadReport

    @property
    def decoder(self) -> LinearDecoder:
        return _DECODERS[self.report.dialect.dialect]

    def quantized_weight(self, module: str, shape: tuple[int, ...]) -> DecodedLinear | None:
        modules = self.report.dialect.modules
        stored = next((modules[p] for p in self.names.candidates(module) if p in modules), None)
        if stored is None or stored.role is not ModuleRole.LINEAR:
            return None
        if len(shape) != 2:
            raise CheckpointError(f"{stored.name} is quantized, but {module}.weight is not a 2-D matrix")
        decoded = self.decoder.decode(self.store, stored, (shape[0], shape[1]), self.report.dtype)
        self.report.dequantized[module] = decoded.scheme
        return decoded

    def value(self, key: str, target: torch.Tensor) -> tuple[torch.Tensor, DecodedLinear | None] | None:
        """The dense value of state-dict entry ``key`` (None when the checkpoint lacks it)."""
        module, _, leaf = key.rpartition(".")
        if leaf == "weight":
            quantized = self.quantized_weight(module, tuple(target.shape))
            if quantized is not None:
                return quantized.weight, quantized
        name = self.store.first(tuple(dict.fromkeys((self.names.tensor(key), key))))
        if name is None:
            return None
        stored = self.store.get(name)
        if stored.dtype in _PACKED_DTYPES and target.dtype not in _PACKED_DTYPES:
            raise CheckpointError(f"{name} is stored as {stored.dtype} without the scale tensors that decode it")
        if tuple(stored.shape) != tuple(target.shape):
            raise CheckpointError(f"{name} has shape {tuple(stored.shape)}, the model expects {tuple(target.shape)}")
        return stored, None


def _no_init() -> Any:
    try:  # parameters are all overwritten: skip the random initialisation
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover  (older transformers)
        return nullcontext()
    return no_init_weights()


def _construct(config: Any, dtype: torch.dtype, device: torch.device) -> nn.Module:
    import transformers
    from transformers import AutoModelForCausalLM

    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    with torch.device(device), _no_init():
        if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
            return model_class._from_config(config, dtype=dtype)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _build_model(directory: Path, dtype: torch.dtype, device: torch.device, stored_bytes: int) -> nn.Module:
    """The model ``config.json`` describes, first on the meta device to bound its size by the checkpoint's."""
    from transformers import AutoConfig, GenerationConfig

    config_file = directory / "config.json"
    try:
        config = AutoConfig.from_pretrained(directory)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantized: transformers must not quantize
        needed = _model_bytes(_construct(config, dtype, torch.device("meta")))
    except Exception as exc:  # transformers raises ValueError, KeyError, TypeError ... on a bad config
        raise CheckpointError(f"{config_file}: transformers cannot build a model from it: {exc!r:.300}") from None
    if needed > MAX_EXPANSION * stored_bytes + (64 << 20):
        raise CheckpointError(
            f"{config_file} describes a model of {needed / 1e9:.3g} GB in {dtype}, but the safetensors files hold "
            f"only {stored_bytes / 1e9:.3g} GB; the config does not belong to these weights"
        )
    try:
        model = _construct(config, dtype, device)
    except Exception as exc:
        raise CheckpointError(f"{config_file}: transformers cannot build the model: {exc!r:.300}") from None
    model.tie_weights()  # skipped with the initialisation
    if (directory / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(directory)
        except Exception as exc:  # a broken generation config does not affect the weights
            logger.warning("%s/generation_config.json is ignored: %s", directory, exc)
    return model.eval()


def _require_finite(name: str, tensor: torch.Tensor) -> None:
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(
            f"{name} holds {bad} NaN or infinite values after decoding; the checkpoint is corrupt "
            "(quantport check names the tensor and the rule)"
        )


def _fill_tensors(reader: _Reader, skip: set[str]) -> dict[str, DecodedLinear]:
    """Fill every parameter and persistent buffer not in ``skip``; return the quantized Linears."""
    model = reader.model
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tied: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key not in skip:
            tied.setdefault(id(tensor), []).append((key, tensor))
    quantized: dict[str, DecodedLinear] = {}
    missing: list[str] = []
    for members in tied.values():
        found = next(((k, t, v) for k, t in members if (v := reader.value(k, t)) is not None), None)
        if found is None:
            if any(k in parameters for k, _ in members):
                missing.append(members[0][0])
            else:
                logger.warning("buffer %s is not in the checkpoint; keeping its built value", members[0][0])
            continue
        key, tensor, (value, stored) = found
        if any(k in parameters for k, _ in members):
            _require_finite(key, value)
        with torch.no_grad():
            tensor.copy_(value)
        if stored is not None:
            quantized[key.rpartition(".")[0]] = stored
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"the checkpoint lacks {len(missing)} parameter(s) of the model: {shown}")
    return quantized


def _load_kv_scales(reader: _Reader, simulate: bool) -> None:
    kv_algo = reader.report.dialect.config.kv_cache
    for name, attention in find_attention_modules(reader.model):
        scales = []
        for projection, leaf in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
            holders = (*reader.names.candidates(f"{name}.{projection}"), *reader.names.candidates(name))
            stored = reader.store.first([f"{p}.{leaf}" for p in holders])
            scales.append(reader.store.get(stored) if stored is not None else None)
        if not simulate or kv_algo is None:
            continue
        if kv_algo != "FP8":
            raise NotImplementedError(
                f"simulating a {kv_algo} KV cache is not implemented; load with simulate_activations=False"
            )
        if None in scales:
            logger.warning("%s has no stored k_scale/v_scale: simulating scale 1.0, as engines default", name)
        one = torch.ones((), dtype=torch.float32)
        install_kv_scales(attention, *(s if s is not None else one for s in scales))
        reader.report.kv_simulated.append(name)


def _simulate_experts(block: MoEBlock, record: ExpertsRecord) -> None:
    """Make the experts compute as the engine does: the simulator quantize's simulation uses, fed with the
    dequantized weights (already the module's parameters) and the stored per-expert input scales."""
    if record.codec is None or not quantizes_activations(record.codec):
        return
    scales = None
    if record.codec.static_input_scale:
        if record.gate_up_input_scale is None or record.down_input_scale is None:
            raise CheckpointError(
                f"the experts of {record.name} have no input scales in the checkpoint, so their activations "
                "cannot be simulated; load with simulate_activations=False"
            )
        scales = {"gate_up": record.gate_up_input_scale, "down": record.down_input_scale}
    attach_experts_simulator(block, record.codec, scales)


def _simulate_linear_inputs(model: nn.Module, quantized: dict[str, DecodedLinear], report: LoadReport) -> None:
    modules = dict(model.named_modules())
    for name, stored in quantized.items():
        if not quantizes_activations(stored.codec):
            continue
        if not stored.activations_known:
            raise NotImplementedError(
                f"{name}: the checkpoint's activation quantization differs from every {stored.scheme} scheme "
                "quantport simulates; load with simulate_activations=False (the weights decode exactly)"
            )
        if stored.codec.static_input_scale and stored.input_scale is None:
            raise CheckpointError(
                f"{name} ({stored.scheme}) has no input_scale in the checkpoint, so its "
                "activations cannot be simulated; load with simulate_activations=False"
            )
        install_input_fake_quant(modules[name], stored.codec, stored.input_scale)
        report.activations_simulated.append(name)


def load(directory: str | Path, simulate_activations: bool = False, device: str | torch.device = "cpu") -> nn.Module:
    """Load the checkpoint in ``directory`` as a dense transformers model, weights dequantized.

    Args:
        directory: a checkpoint directory (``config.json`` and safetensors files).
        simulate_activations: also fake-quantize activations as the engine does (stored input
            scales, dynamic schemes, FP8 KV cache), so that logits equal the quantized model's
            :func:`quantport.simulate` logits.
        device: where to build the model (``cpu``, ``cuda``, ``cuda:N`` or ``auto``).

    Returns:
        The model in eval mode; :func:`load_report` tells what was read.

    Raises:
        ModelLoadError: missing directory or config.
        CheckpointError: (a :class:`~quantport.errors.QuantportError`) unknown quantization method or
            algorithm; missing, malformed or non-finite tensors; a corrupt, truncated or non-regular
            file, a broken index or config (each named in the message).
        NotImplementedError: ``simulate_activations`` with a non-FP8 KV cache, or with activation
            arguments no quantport scheme has (the weights alone load).
    """
    directory = Path(directory)
    try:
        return _load(directory, simulate_activations, device)
    except OSError as exc:  # a file vanished or an I/O error while reading
        where = exc.filename or directory
        raise CheckpointError(f"{where}: cannot be read: {exc.strerror or exc}") from None


def _load(directory: Path, simulate_activations: bool, device: str | torch.device) -> nn.Module:
    config = read_config(directory)
    target = device if isinstance(device, torch.device) else resolve_device(device)
    store = TensorStore(directory, target)
    dialect = read_dialect(directory, config, store.names())
    dtype = store.most_common_dtype() or torch.float32
    model = _build_model(directory, dtype, target, store.stored_bytes())
    report = LoadReport(directory, dialect, dtype)
    reader = _Reader(model, HubNames(model), store, report)
    skip: set[str] = set()
    for block in find_moe_blocks(model):
        record = load_experts(block, reader.names, store, dialect, reader.decoder, dtype)
        for param in ("gate_up_proj", "down_proj"):
            _require_finite(f"{block.experts_name}.{param}", getattr(block.experts, param))
        if simulate_activations:
            _simulate_experts(block, record)
        report.experts.append(record)
        skip.update({f"{block.experts_name}.gate_up_proj", f"{block.experts_name}.down_proj"})
    quantized = _fill_tensors(reader, skip)
    _load_kv_scales(reader, simulate_activations)
    if simulate_activations:
        _simulate_linear_inputs(model, quantized, report)
    report.unused_tensors = store.unused()
    if report.unused_tensors:
        logger.warning(
            "%d checkpoint tensor(s) were not used: %s",
            len(report.unused_tensors),
            ", ".join(report.unused_tensors[:8]),
        )
    model.__dict__[_REPORT_ATTR] = report
    logger.info(
        "loaded %s: %d dequantized Linear layers, %d experts modules",
        directory,
        len(report.dequantized),
        len(report.experts),
    )
    return model


def validate_files(directory: str | Path) -> None:
    """Read what :func:`load` reads first (config, dialect, index, every safetensors header)
    and raise its :class:`CheckpointError` now, before anything expensive is loaded (``quantport eval``)."""
    directory = Path(directory)
    try:
        config = read_config(directory)
        read_dialect(directory, config, TensorStore(directory, torch.device("cpu")).names())
    except OSError as exc:
        raise CheckpointError(f"{exc.filename or directory}: cannot be read: {exc.strerror or exc}") from None


def load_report(model: nn.Module) -> LoadReport:
    """The :class:`LoadReport` of a model returned by :func:`load`."""
    report = model.__dict__.get(_REPORT_ATTR)
    if report is None:
        raise ValueError("this model was not loaded with quantport.load")
    return report
