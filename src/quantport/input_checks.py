"""What :func:`quantport.quantize` refuses before it changes the model, and the statistics it refuses after
calibration: input that would otherwise give a checkpoint of silent garbage.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import AlreadyQuantizedError, InvalidActivationsError, InvalidArgumentError
from .modules.kv_cache import kv_quantizer_of
from .modules.quant_experts import experts_quantizer_of
from .modules.quant_linear import QuantLinear
from .state import iter_quant_modules

__all__ = ["check_exclude_patterns", "check_finite_statistics", "refuse_quantized"]

_STATE_ATTR = "quantport_state"
_PACKED_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.int8, torch.int32)


def _quant_method(config: Any) -> str | None:
    if config is None:
        return None
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is None and hasattr(config, "get_text_config"):
        qconfig = getattr(config.get_text_config(), "quantization_config", None)
    if qconfig is None:
        return None
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")


def refuse_quantized(model: nn.Module) -> None:
    """Raise :class:`AlreadyQuantizedError` when ``model`` is quantized already: by quantport (``quantize`` ran
    on it), by transformers (a checkpoint with a ``quantization_config``), or with packed/FP8 Linear weights."""
    if model.__dict__.get(_STATE_ATTR) is not None or next(iter_quant_modules(model), None) is not None:
        raise AlreadyQuantizedError(
            "the model is already quantized by quantport (quantize() ran on it); quantizing it again would "
            "quantize the simulated model. Load the full-precision model again and quantize that"
        )
    method = _quant_method(getattr(model, "config", None))
    if method is not None or getattr(model, "hf_quantizer", None) is not None:
        raise AlreadyQuantizedError(
            f"the model was loaded from a quantized checkpoint (quant_method {method!r}); quantport quantizes "
            "full-precision (bf16/fp16/fp32) models only: load the original unquantized model"
        )
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and weight.dtype in _PACKED_DTYPES:
            raise AlreadyQuantizedError(
                f"{name}.weight is {weight.dtype} (quantized or packed); quantport quantizes full-precision "
                "(bf16/fp16/fp32) models only: load the original unquantized model"
            )


def _suggestions(pattern: str, names: Sequence[str], modules: Iterable[str]) -> str:
    if pattern in set(modules):
        return f"; it names a module, not its layers: use {pattern + '.*'!r}"
    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.6)
    return f"; closest layer names: {', '.join(close)}" if close else f"; layer names look like {names[0]!r}"


def check_exclude_patterns(model: nn.Module, patterns: Sequence[str], candidates: Sequence[str]) -> None:
    """Every user exclusion pattern must match at least one layer that could be quantized (``candidates``:
    Linear and experts module names); a pattern that matches nothing is most likely a typo."""
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidArgumentError(f"--exclude {pattern!r} is not a module-name pattern; give e.g. '*.layers.0.*'")
        if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
            hint = _suggestions(pattern, candidates, (n for n, _ in model.named_modules())) if candidates else ""
            raise InvalidArgumentError(
                f"--exclude {pattern!r} matches no layer of the model (patterns are shell wildcards over full "
                f"module names){hint}"
            )


def _statistics(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.input_amax is not None:
            found.append((name, module.input_amax))
        kv = kv_quantizer_of(module)
        if kv is not None:
            found += [
                (f"{name} ({part} cache)", amax)
                for part, amax in (("k", kv.k_amax), ("v", kv.v_amax))
                if amax is not None
            ]
        experts = experts_quantizer_of(module)
        if experts is not None:
            found += [(f"{name} ({projection})", amax) for projection, amax in experts.input_amax.items()]
    return found


def check_finite_statistics(model: nn.Module) -> None:
    """Raise :class:`InvalidActivationsError` naming the modules whose calibrated activation amax is NaN or
    infinite (their input scale would be silently sanitised to 1.0). One host synchronisation in all."""
    found = _statistics(model)
    if not found:
        return
    device = found[0][1].device
    flags = torch.stack([torch.isfinite(amax).all().to(device) for _, amax in found])
    if bool(flags.all()):
        return
    bad = [name for (name, _), ok in zip(found, flags.tolist(), strict=True) if not ok]
    shown = ", ".join(bad[:5]) + (f" ... and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise InvalidActivationsError(
        f"calibration saw NaN or infinite activations in {len(bad)} module(s), in model order {shown}; check the "
        "model's weights and dtype (fp16 overflow: load it in bf16 or fp32), --exclude the layer(s) where it "
        "starts, or calibrate on other text (--calib-text)"
    )
