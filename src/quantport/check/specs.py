"""Expected tensors of one quantized Linear, per format (engine-contract.md §2 and §4 tables).

A :class:`Spec` gives the dtypes and the shape a parameter must have, derived from the module's
weight; :func:`modelopt_specs` and :func:`ct_specs` return them for a ModelOpt ``quant_algo`` or a
compressed-tensors config group. Block sizes come from :mod:`quantport.formats`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quantport.formats.fp8 import FP8_BLOCK
from quantport.formats.mx import MX_BLOCK
from quantport.formats.nvfp4 import NVFP4_BLOCK

from .checkpoint import TensorInfo

__all__ = ["FLOAT_SCALE", "SCALAR", "LayerSpec", "Spec", "ct_specs", "modelopt_specs"]

SCALAR: tuple[int, ...] = ()
"""Marks a per-tensor scale: 0-D or ``[1]`` are both accepted."""
FP8 = ("F8_E4M3",)
F32 = ("F32",)
FLOAT_SCALE = ("F32", "BF16", "F16")
E8M0 = ("U8", "F8_E8M0")


@dataclass(frozen=True)
class Spec:
    """dtypes and shapes one parameter may have."""

    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    required: bool = True

    def shape_ok(self, shape: tuple[int, ...]) -> bool:
        if SCALAR in self.shapes and shape in ((), (1,)):
            return True
        return shape in self.shapes

    def describe(self) -> str:
        shapes = " or ".join("scalar" if s == SCALAR else str(list(s)) for s in self.shapes)
        return f"{'/'.join(self.dtypes)} {shapes}"


@dataclass(frozen=True)
class LayerSpec:
    """What a quantized Linear must hold.

    Attributes:
        label: the format, for messages.
        params: parameter -> spec.
        tolerated: parameters allowed but not needed (e.g. W4A16_NVFP4's ``input_scale``).
        divisibility: (in_features, multiple) when the format needs ``in % multiple == 0``.
    """

    label: str
    params: dict[str, Spec]
    tolerated: frozenset[str] = frozenset()
    divisibility: tuple[int, int] | None = None


def _scalar(dtypes: tuple[str, ...] = F32, required: bool = True) -> Spec:
    return Spec(dtypes, (SCALAR,), required)


def _nvfp4(o: int, c: int, *, activations: bool) -> LayerSpec:
    n = 2 * c
    params = {
        "weight": Spec(("U8",), ((o, c),)),
        "weight_scale": Spec(FP8, ((o, n // NVFP4_BLOCK),)),
        "weight_scale_2": _scalar(),
    }
    if activations:
        params["input_scale"] = _scalar()
    label = "NVFP4" if activations else "W4A16_NVFP4"
    return LayerSpec(label, params, frozenset() if activations else frozenset({"input_scale"}), (n, NVFP4_BLOCK))


def _fp8_block(o: int, i: int) -> LayerSpec:
    bo, bi = FP8_BLOCK
    grid = (math.ceil(o / bo), math.ceil(i / bi))
    scale = Spec(F32, ((grid[0], 1, grid[1], 1), grid))
    return LayerSpec("FP8_PB_WO", {"weight": Spec(FP8, ((o, i),)), "weight_scale": scale}, divisibility=(i, bi))


_MODELOPT: dict[str, Callable[[int, int], LayerSpec]] = {
    "FP8": lambda o, i: LayerSpec(
        "FP8", {"weight": Spec(FP8, ((o, i),)), "weight_scale": _scalar(), "input_scale": _scalar()}
    ),
    "FP8_PER_CHANNEL_PER_TOKEN": lambda o, i: LayerSpec(
        "FP8_PER_CHANNEL_PER_TOKEN", {"weight": Spec(FP8, ((o, i),)), "weight_scale": Spec(F32, ((o,), (o, 1)))}
    ),
    "FP8_PB_WO": _fp8_block,
    "FP8_BLOCK_SCALES": _fp8_block,
    "NVFP4": lambda o, c: _nvfp4(o, c, activations=True),
    "W4A16_NVFP4": lambda o, c: _nvfp4(o, c, activations=False),
    "MXFP8": lambda o, i: LayerSpec(
        "MXFP8",
        {"weight": Spec(FP8, ((o, i),)), "weight_scale": Spec(E8M0, ((o, i // MX_BLOCK),))},
        divisibility=(i, MX_BLOCK),
    ),
}


def modelopt_specs(algo: str, weight: TensorInfo) -> LayerSpec | None:
    """The tensors of a ModelOpt Linear quantized with ``algo`` whose ``weight`` is as given."""
    make = _MODELOPT.get(algo)
    if make is None or weight.ndim != 2:
        return None
    return make(*weight.shape)


def _ct_weight_scale(w: dict[str, Any], o: int, i: int) -> tuple[tuple[int, ...], ...]:
    strategy = w.get("strategy") or ("group" if w.get("group_size") else "tensor")
    if strategy == "tensor":
        return (SCALAR,)
    if strategy == "channel":
        return ((o, 1), (o,))
    if strategy in ("group", "tensor_group"):
        return ((o, math.ceil(i / int(w.get("group_size") or 1))),)
    if strategy == "block":
        bo, bi = (w.get("block_structure") or [1, 1])[:2]
        return ((math.ceil(o / bo), math.ceil(i / bi)),)
    return ()


def _ct_unpacked(
    fmt: str, w: dict[str, Any], acts: dict[str, Any] | None, params: dict[str, TensorInfo]
) -> LayerSpec | None:
    """float-quantized, naive-quantized, int-quantized: an unpacked ``weight`` [out, in]."""
    weight = params.get("weight")
    if weight is None or weight.ndim != 2:
        return None
    o, i = weight.shape
    wdtype = FP8 if w.get("type") == "float" else ("I8",)
    specs = {"weight": Spec(wdtype, ((o, i),)), "weight_scale": Spec(FLOAT_SCALE, _ct_weight_scale(w, o, i))}
    if acts and acts.get("dynamic") is False:
        specs["input_scale"] = _scalar(FLOAT_SCALE)
        if acts.get("symmetric") is False:
            specs["input_zero_point"] = _scalar(("I8", "I32", "F8_E4M3"))
    if w.get("symmetric") is False:
        specs["weight_zero_point"] = Spec(("I8", "I32"), _ct_weight_scale(w, o, i))
    return LayerSpec(fmt, specs)


def _ct_int_packed(
    fmt: str, w: dict[str, Any], params: dict[str, TensorInfo], in_features: int | None
) -> LayerSpec | None:
    """pack-quantized: int32 words along the input, ``weight_shape`` = (out, in)."""
    packed = params.get("weight_packed")
    if packed is None or packed.ndim != 2 or in_features is None:
        return None
    o, bits, i = packed.shape[0], int(w.get("num_bits") or 4), in_features
    scale_shapes = _ct_weight_scale(w, o, i)
    specs = {
        "weight_packed": Spec(("I32",), ((o, math.ceil(i * bits / 32)),)),
        "weight_shape": Spec(("I64", "I32"), ((2,),)),
        "weight_scale": Spec(FLOAT_SCALE, scale_shapes),
    }
    if w.get("symmetric") is False:
        groups = scale_shapes[0][-1] if scale_shapes and scale_shapes[0] else 1
        specs["weight_zero_point"] = Spec(("I32",), ((math.ceil(o * bits / 32), groups),))
    return LayerSpec(fmt, specs, frozenset({"weight_g_idx"}))


def _ct_fp4_packed(fmt: str, acts: dict[str, Any] | None, params: dict[str, TensorInfo]) -> LayerSpec | None:
    """nvfp4-pack-quantized / mxfp4-pack-quantized: two E2M1 codes per byte."""
    packed = params.get("weight_packed")
    if packed is None or packed.ndim != 2:
        return None
    o, c = packed.shape
    nvfp4 = fmt.startswith("nvfp4")
    block = NVFP4_BLOCK if nvfp4 else MX_BLOCK
    specs = {
        "weight_packed": Spec(("U8",), ((o, c),)),
        "weight_scale": Spec(FP8 if nvfp4 else E8M0, ((o, 2 * c // block),)),
    }
    if nvfp4:
        specs["weight_global_scale"] = _scalar()
        if acts:
            specs["input_global_scale"] = _scalar()
    return LayerSpec(fmt, specs, divisibility=(2 * c, block))


def ct_specs(
    fmt: str,
    w: dict[str, Any],
    acts: dict[str, Any] | None,
    params: dict[str, TensorInfo],
    in_features: int | None = None,
) -> LayerSpec | None:
    """The tensors of a compressed-tensors Linear in format ``fmt`` with weight args ``w``.

    ``in_features`` is needed for pack-quantized (read from ``weight_shape``)."""
    if fmt in ("float-quantized", "naive-quantized", "int-quantized"):
        return _ct_unpacked(fmt, w, acts, params)
    if fmt == "pack-quantized":
        return _ct_int_packed(fmt, w, params, in_features)
    if fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        return _ct_fp4_packed(fmt, acts, params)
    weight = params.get("weight")
    if fmt == "mxfp8-quantized" and weight is not None and weight.ndim == 2:
        o, i = weight.shape
        return LayerSpec(
            fmt,
            {"weight": Spec(FP8, ((o, i),)), "weight_scale": Spec(E8M0, ((o, i // MX_BLOCK),))},
            divisibility=(i, MX_BLOCK),
        )
    return None
