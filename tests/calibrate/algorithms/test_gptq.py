"""GPTQ on one weight: lower output error than round-to-nearest, equal to the paper's column-by-column loop,
and a replacement weight that every codec quantizes back to GPTQ's choice."""

from __future__ import annotations

import pytest
import torch

from quantport.algorithm_options import GptqOptions
from quantport.calibrate.algorithms.gptq import gptq_weight, inverse_hessian_factor
from quantport.errors import InvalidArgumentError
from quantport.recipes import LinearScheme
from quantport.schemes import codec_for

W4A16 = codec_for(LinearScheme.W4A16)


def _correlated_problem(out_features=24, in_features=256, tokens=2048, dtype=torch.float32, seed=0):
    """A weight and inputs whose features are strongly correlated (a few latent directions plus noise)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 16, generator=g)
    mixing = torch.randn(16, in_features, generator=g)
    x = latent @ mixing + 0.1 * torch.randn(tokens, in_features, generator=g)
    x[:, :8] *= 8  # a few loud inputs, where act-order matters
    weight = (torch.randn(out_features, in_features, generator=g) * 0.05).to(dtype)
    return weight, x, x.T @ x / tokens


def _rtn(codec, weight):
    amax = weight.float().abs().amax()
    return codec.dequantize_weight(codec.quantize_weight(weight, amax), weight.dtype)


def _output_error(x, weight, quantized):
    return float((x @ weight.float().T - x @ quantized.float().T).norm())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", [LinearScheme.W4A16, LinearScheme.W4A16_ASYM, LinearScheme.W8A16])
def test_gptq_output_error_is_lower_than_round_to_nearest(scheme, act_order):
    codec = codec_for(scheme)
    weight, x, hessian = _correlated_problem()
    result = gptq_weight(codec, weight, weight.abs().amax(), hessian, GptqOptions(act_order=act_order))
    gptq_error = _output_error(x, weight, result.dequantized)
    rtn_error = _output_error(x, weight, _rtn(codec, weight))
    assert gptq_error < 0.75 * rtn_error, (gptq_error, rtn_error)


def _reference_int4_gptq(weight, hessian, damp=0.01, group=128, act_order=False, static_groups=False):
    """The paper's algorithm written out column by column (no lazy batches), with compressed-tensors' symmetric
    INT4 group quantizer (scale amax/7.5, codes -8..7) and the documented scale rule: a group's max |w| is taken
    when the loop reaches it (from the original weights with act-order), and the element holding it keeps that
    value."""
    w = weight.double().clone()
    h = hessian.double().clone()
    n = w.shape[1]
    order = torch.argsort(torch.diagonal(hessian), descending=True) if act_order else torch.arange(n)
    h = h[order][:, order]
    h += torch.eye(n, dtype=h.dtype) * damp * torch.diagonal(h).mean()
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = w[:, order]
    q_out = torch.zeros_like(w)
    top = holder = held = None
    tops, holders, helds = {}, {}, {}
    static = act_order or static_groups
    if static:
        for g0 in range(0, n, group):
            block = weight[:, g0 : g0 + group].float()
            tops[g0], where = block.abs().max(dim=1)
            holders[g0] = where + g0
            helds[g0] = block.gather(1, where[:, None]).squeeze(1)
    for j in range(n):
        column = int(order[j])
        g0 = column - column % group
        if static:
            top, holder, held = tops[g0], holders[g0], helds[g0]
        elif column == g0:
            block = w[:, j : j + group].float()
            top, where = block.abs().max(dim=1)
            holder = where + g0
            held = block.gather(1, where[:, None]).squeeze(1)
        scale = top / 7.5  # fp32, like the weight
        value = torch.where(holder == column, held, torch.minimum(torch.maximum(w[:, j].float(), -top), top))
        q = (torch.clamp(torch.round(value / scale), -8, 7) * scale).double()
        q_out[:, j] = q
        error = (w[:, j] - q) / upper[j, j]
        w[:, j:] -= error[:, None] * upper[j, j:][None, :]
    return q_out[:, torch.argsort(order)]


@pytest.mark.parametrize("block_size", [128, 256])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_the_papers_column_by_column_loop(act_order, block_size):
    """Scales from the original weights: lazy batches give the paper's codes exactly."""
    weight, x, hessian = _correlated_problem(out_features=16, in_features=384)
    options = GptqOptions(act_order=act_order, block_size=block_size, static_groups=True)
    result = gptq_weight(W4A16, weight, weight.abs().amax(), hessian, options)
    reference = _reference_int4_gptq(weight, hessian, act_order=act_order, static_groups=True)
    assert torch.allclose(result.dequantized.double(), reference, rtol=0, atol=1e-6)


def test_scales_chosen_in_the_loop_match_the_reference_up_to_rounding_ties():
    """Scales from the updated weights: a scale's last bit follows the arithmetic order (fp32 lazy batches
    vs fp64 columns), which can flip an element sitting exactly on a rounding tie (the max |w| of a negative
    group, -7.5 steps), and GPTQ then carries on from there; the two reach the same output error."""
    weight, x, hessian = _correlated_problem(out_features=16, in_features=384)
    result = gptq_weight(W4A16, weight, weight.abs().amax(), hessian, GptqOptions())
    reference = _reference_int4_gptq(weight, hessian)
    assert (result.dequantized.double() - reference).abs().le(1e-6).float().mean() > 0.8
    ours, theirs = _output_error(x, weight, result.dequantized), _output_error(x, weight, reference)
    assert abs(ours - theirs) < 0.03 * theirs, (ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "scheme",
    [
        LinearScheme.W4A16,
        LinearScheme.W4A16_ASYM,
        LinearScheme.W8A16,
        LinearScheme.W8A16_ASYM,
        LinearScheme.INT8,
        LinearScheme.W4A16_MODELOPT,
        LinearScheme.NVFP4,
        LinearScheme.NVFP4_CT,
        LinearScheme.MXFP4,
        LinearScheme.FP8,
        LinearScheme.FP8_DYNAMIC,
    ],
)
def test_the_replacement_weight_quantizes_to_gptqs_choice(scheme, dtype):
    codec = codec_for(scheme)
    weight, _, hessian = _correlated_problem(in_features=256, dtype=dtype)
    amax = weight.float().abs().amax()
    result = gptq_weight(codec, weight, amax, hessian, GptqOptions())
    assert result.weight.dtype == dtype and result.dequantized.dtype == dtype
    decoded = codec.dequantize_weight(codec.quantize_weight(result.weight, amax), dtype)
    assert torch.equal(decoded, result.dequantized)
    assert not torch.equal(result.dequantized, _rtn(codec, weight))  # GPTQ moved some codes


def test_dead_inputs_and_a_singular_hessian_are_dampened():
    weight, x, _ = _correlated_problem(in_features=128, tokens=64)  # fewer tokens than inputs: singular
    x[:, 5] = 0  # an input that never fires: zero row and column in the Hessian
    hessian = x.T @ x / x.shape[0]
    result = gptq_weight(W4A16, weight, weight.abs().amax(), hessian, GptqOptions(damp=0.0))
    assert result.damp > 0  # rank-deficient without dampening: raised until it factorises
    assert torch.isfinite(result.dequantized).all()
    upper, damp = inverse_hessian_factor(torch.eye(4), 0.01)
    assert damp == 0.01 and torch.allclose(upper, torch.eye(4) / 1.01**0.5)


def test_block_size_must_cover_whole_groups():
    weight, _, hessian = _correlated_problem(in_features=256)
    with pytest.raises(InvalidArgumentError, match="multiple of int4-g128's group size 128"):
        gptq_weight(W4A16, weight, weight.abs().amax(), hessian, GptqOptions(block_size=96))
    with pytest.raises(InvalidArgumentError, match="2-D block scales"):
        gptq_weight(codec_for(LinearScheme.FP8_BLOCK), weight, weight.abs().amax(), hessian, GptqOptions())
