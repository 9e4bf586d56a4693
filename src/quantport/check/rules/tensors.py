"""dtype, shape and divisibility of every tensor of every quantized Linear (engine-contract.md §2,
§4, §8.3), for ModelOpt ``quant_algo`` and compressed-tensors config groups."""

from __future__ import annotations

from collections.abc import Iterator

from ...read.quant_config import declared_reader_of
from ..checkpoint import TensorInfo
from ..findings import Finding, Rule
from ..matchers import ct_matches, is_class_name
from ..qconfig import CTGroup, Format
from ..specs import LayerContract, LayerSpec, ct_specs, declared_contract, modelopt_specs
from ..structure import QPARAMS, Context, fused_expert_param, is_quantized
from .exclusions import engine_excludes

__all__ = ["check", "ct_group_for", "spec_for"]

MISSING = Rule(
    "tensor.missing",
    "a quantized Linear lacks a tensor its format requires",
    "re-export the layer with all its tensors (scales included)",
)
DTYPE = Rule(
    "tensor.dtype",
    "a tensor has the wrong dtype for its format",
    "write the tensor in the dtype the format defines (see engine-contract.md §2 / §4)",
)
SHAPE = Rule(
    "tensor.shape",
    "a tensor has the wrong shape for its format",
    "write the tensor in the shape the format defines (see engine-contract.md §2 / §4)",
)
UNEXPECTED = Rule(
    "tensor.unexpected",
    "a quantized Linear has a tensor its format does not define",
    "delete the tensor; the engine registers no parameter for it and fails to load",
)
DIVISIBILITY = Rule(
    "tensor.divisibility",
    "in_features is not a multiple of the format's block",
    "leave the layer unquantized (and exclude it), or pad it to a multiple of the block",
)
OWNED_ELSEWHERE = frozenset({"weight_shape", "pre_quant_scale"})
"""Under ModelOpt these are reported by the stray-tensor rules."""


def ct_group_for(ctx: Context, module: str) -> CTGroup | None:
    """The config group compressed-tensors applies to ``module``: exact name, then regex, then class."""
    groups = ctx.qcfg.ct_groups
    for predicate in (
        lambda t: not t.startswith("re:") and not is_class_name(t) and t == module,
        lambda t: t.startswith("re:") and ct_matches(module, t),
        lambda t: t == "Linear",
    ):
        for group in groups:
            if any(predicate(t) for t in group.targets):
                return group
    return None


def _positive_int(value: object) -> bool:
    return type(value) is int and value > 0


def _usable_weight_args(w: dict) -> bool:
    """Whether the sizes in a group's weight arguments can be computed with (the config rules report the rest)."""
    if any(key in w and w[key] is not None and not _positive_int(w[key]) for key in ("num_bits", "group_size")):
        return False
    block = w.get("block_structure")
    return block is None or (isinstance(block, list) and len(block) == 2 and all(map(_positive_int, block)))


def _ct_spec(ctx: Context, module: str, params: dict[str, TensorInfo]) -> LayerSpec | None:
    group = ct_group_for(ctx, module)
    if group is None or group.weights is None or not _usable_weight_args(group.weights):
        return None
    fmt = group.format or ctx.qcfg.ct_format or ""
    in_features = None
    if "weight_shape" in params:
        shape = ctx.ckpt.load(f"{module}.weight_shape")
        if shape is not None and shape.numel() == 2:
            in_features = int(shape[1])
    weight, packed = params.get("weight"), params.get("weight_packed")  # the only tensors ct_specs looks at
    key = ("ct-spec", id(group), fmt, weight and weight.shape, packed and packed.shape, in_features)
    if key not in ctx.memo:
        ctx.memo[key] = ct_specs(fmt, group.weights, group.input_activations, params, in_features)
    return ctx.memo[key]  # type: ignore[return-value]


def spec_for(ctx: Context, module: str, params: dict[str, TensorInfo]) -> LayerSpec | None:
    """The expected tensors of quantized module ``module`` (None when no scheme applies to it)."""
    if ctx.qcfg.format is Format.MODELOPT:
        algo = ctx.modelopt_algo(module)  # None under MIXED_PRECISION when unlisted: an exclusion finding
        weight = params.get("weight")
        if algo is None or weight is None:
            return None
        key = ("spec", algo, weight.shape)  # every expert of a layer has the same spec
        if key not in ctx.memo:
            ctx.memo[key] = modelopt_specs(algo, weight)
        return ctx.memo[key]  # type: ignore[return-value]
    if ctx.qcfg.format is Format.COMPRESSED_TENSORS:
        return _ct_spec(ctx, module, params)
    contract = _contract(ctx)
    if contract is None:
        return None
    reader = declared_reader_of(ctx.qcfg.format)
    return contract.spec(None if reader is None else reader.scheme(ctx.qcfg, module, "linear"), params)


def _contract(ctx: Context) -> LayerContract | None:
    if ctx.qcfg.format in (Format.MODELOPT, Format.COMPRESSED_TENSORS, Format.MXFP4, Format.UNKNOWN, Format.NONE):
        return None
    return declared_contract(ctx.qcfg.format.value)


def _module_findings(
    ctx: Context, module: str, params: dict[str, TensorInfo], spec: LayerSpec, expert: bool
) -> Iterator[Finding]:
    for param, want in spec.params.items():
        info = params.get(param)
        name = f"{module}.{param}"
        if info is None:
            if want.required and not expert:
                yield MISSING.finding(name, f"{spec.label} layer {module} has no {param}")
            continue
        if info.dtype not in want.dtypes:
            yield DTYPE.finding(name, f"{param} is {info.dtype}; {spec.label} needs {'/'.join(want.dtypes)}")
        elif not want.shape_ok(info.shape):
            yield SHAPE.finding(name, f"{param} has shape {list(info.shape)}; {spec.label} needs {want.describe()}")
    owned = OWNED_ELSEWHERE if ctx.qcfg.format is Format.MODELOPT else frozenset()
    for param in sorted((QPARAMS & params.keys()) - spec.params.keys() - spec.tolerated - owned):
        yield UNEXPECTED.finding(
            f"{module}.{param}", f"{spec.label} layer {module} has {param}, which the engine does not load"
        )
    if spec.divisibility is not None:
        features, multiple = spec.divisibility
        if features % multiple:
            yield DIVISIBILITY.finding(
                module, f"{module}: in_features {features} is not a multiple of {multiple} ({spec.label})"
            )


def check(ctx: Context) -> Iterator[Finding]:
    if ctx.qcfg.format not in (Format.MODELOPT, Format.COMPRESSED_TENSORS) and _contract(ctx) is None:
        return
    for module, params in sorted(ctx.weight_modules.items()):
        if not is_quantized(params) or any(fused_expert_param(p) for p in params):
            continue
        if engine_excludes(ctx, module):
            continue  # an excluded layer with scales is the exclusion rules' finding
        spec = spec_for(ctx, module, params)
        if spec is not None:
            yield from _module_findings(ctx, module, params, spec, module in ctx.expert_of)
