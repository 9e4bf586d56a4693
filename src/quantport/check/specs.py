"""Expected tensors of one quantized Linear, per format (engine-contract.md §2 and §4 tables).

A :class:`Spec` gives the dtypes and the shape a parameter must have, derived from the module's
weight; :func:`modelopt_specs` and :func:`ct_specs` return them for a ModelOpt ``quant_algo`` or a
compressed-tensors config group. ModelOpt's follow from the numeric format descriptor the ModelOpt dialect's
vocabulary (:mod:`quantport.dialects.modelopt`) names for the algorithm, compressed-tensors' from the
group's ``QuantizationArgs``; block sizes come from :mod:`quantport.formats`. No codec is called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from quantport.dialects import declared
from quantport.dialects.modelopt import numeric_format
from quantport.formats.descriptors import Element, NumericFormat, ScaleGranularity, ScaleType
from quantport.formats.mx import MX_BLOCK
from quantport.formats.nvfp4 import NVFP4_BLOCK

from .checkpoint import TensorInfo

__all__ = [
    "FLOAT_SCALE",
    "SCALAR",
    "LayerContract",
    "LayerSpec",
    "Spec",
    "ct_specs",
    "declared_contract",
    "modelopt_specs",
]

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


_MODELOPT_ALIASES = {"FP8_BLOCK_SCALES": "FP8_PB_WO"}
"""ModelOpt algorithms quantport does not write, stored like one it does (nvidia-modelopt's 128x128 FP8 blocks)."""
_STORED_CODES: dict[Element, tuple[str, ...]] = {
    Element.FP8_E4M3: FP8,
    Element.E2M1: ("U8",),
    Element.INT8: ("I8",),
    Element.INT4: ("U8",),
}


def _modelopt_scale(fmt: NumericFormat, o: int, i: int) -> Spec:
    """ModelOpt's ``weight_scale`` of an ``[out, in]`` weight in ``fmt``."""
    if fmt.granularity is ScaleGranularity.TENSOR:
        return _scalar()
    if fmt.granularity is ScaleGranularity.CHANNEL:
        return Spec(F32, ((o,), (o, 1)))
    block = fmt.block_size or 1
    if fmt.granularity is ScaleGranularity.BLOCK_2D:
        grid = (math.ceil(o / block), math.ceil(i / block))
        return Spec(F32, ((grid[0], 1, grid[1], 1), grid))
    dtypes = E8M0 if fmt.scale_type is ScaleType.E8M0 else FP8 if fmt.global_scale else F32
    return Spec(dtypes, ((o, i // block),))


def _modelopt_layer(label: str, fmt: NumericFormat, stored: tuple[int, int]) -> LayerSpec:
    """ModelOpt's tensors of a Linear whose stored ``weight`` has shape ``stored``: E2M1 codes two per byte along
    the input, INT4 codes two per byte along the output (``W4A16_AWQ``), one per element otherwise."""
    rows, cols = stored
    o, i = {Element.E2M1: (rows, 2 * cols), Element.INT4: (2 * rows, cols)}.get(fmt.element, (rows, cols))
    params = {"weight": Spec(_STORED_CODES[fmt.element], (stored,)), "weight_scale": _modelopt_scale(fmt, o, i)}
    if fmt.global_scale:
        params["weight_scale_2"] = _scalar()
    tolerated: frozenset[str] = frozenset()
    if fmt.needs_calibration:
        params["input_scale"] = _scalar()
    elif fmt.global_scale:
        tolerated = frozenset({"input_scale"})  # nvidia-modelopt writes W4A16_NVFP4's unused input_scale
    return LayerSpec(label, params, tolerated, (i, fmt.input_multiple) if fmt.input_multiple > 1 else None)


def modelopt_specs(algo: str, weight: TensorInfo) -> LayerSpec | None:
    """The tensors of a ModelOpt Linear quantized with ``algo`` whose ``weight`` is as given: derived from the
    numeric format the ModelOpt dialect stores under ``algo`` (its descriptor, never its codec)."""
    label = _MODELOPT_ALIASES.get(algo, algo)
    fmt = numeric_format(label)
    if fmt is None or weight.ndim != 2:
        return None
    return _modelopt_layer(label, fmt, weight.shape)


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


@dataclass(frozen=True)
class LayerContract:
    """The checker's contract of a dialect that declares itself in its own module
    (``LAYER_CONTRACT = LayerContract(...)`` in ``quantport/dialects/<dialect>.py``, found by discovery).

    Attributes:
        dialect: the dialect's value (its :class:`~quantport.dialects.ExportFormat` value).
        spec: (module's scheme as the reader found it, the module's tensors) -> the tensors it must hold,
            or None when nothing can be said.
    """

    dialect: str
    spec: Callable[[str | None, Mapping[str, TensorInfo]], LayerSpec | None]


@cache
def _declared_contracts() -> dict[str, LayerContract]:
    return {contract.dialect: contract for contract in declared("LAYER_CONTRACT")}


def declared_contract(dialect: str) -> LayerContract | None:
    """The declared checker contract of ``dialect`` (a dialect value), if its module declares one."""
    return _declared_contracts().get(dialect)
