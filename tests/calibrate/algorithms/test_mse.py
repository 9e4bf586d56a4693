"""MSE scale search: a weight with one outlier gets a clipped scale and a lower reconstruction error."""

from __future__ import annotations

import pytest
import torch

from quantport.algorithm_options import MseOptions
from quantport.calibrate.algorithms.mse import mse_clipped_weight, mse_tensor_amax
from quantport.calibrate.algorithms.units import ScaleUnits
from quantport.errors import InvalidArgumentError
from quantport.formats.descriptors import Element, ScaleGranularity
from quantport.recipes import LinearScheme
from quantport.schemes import codec_for


def _decode(codec, weight, amax):
    return codec.dequantize_weight(codec.quantize_weight(weight, amax), weight.dtype)


def _outlier_rows(rows=4, width=128, small=0.2, outlier=1.0):
    """Rows of ``small`` with one ``outlier`` first: max scales waste their steps on the outlier."""
    weight = torch.full((rows, width), small)
    weight[:, 0] = outlier
    return weight


def test_int4_group_picks_the_hand_computed_clipping():
    """INT4 (scale amax/7.5): max gives 0.2/(1/7.5) = 1.5 steps, rounded to 2, and the outlier saturates at 7
    steps (error 1/15 on all 128 weights: 0.569);
    ratio 0.75 gives the scale 0.1, so 0.2 is exact and the outlier saturates at 7 * 0.1 = 0.7 (error 0.3 on
    one weight): 0.09 per row; ratio 0.5 (scale 1/15: 0.2 exact, the outlier at 0.467) gives 0.284."""
    codec = codec_for(LinearScheme.W4A16)
    weight = _outlier_rows()
    clipped, ratios = mse_clipped_weight(codec, weight, weight.abs().amax(), MseOptions(min_ratio=0.5, steps=2))
    assert torch.allclose(ratios, torch.full((4,), 0.75))
    decoded = _decode(codec, clipped, weight.abs().amax())
    assert torch.allclose(decoded[:, 1:], torch.full((4, 127), 0.2))
    assert torch.allclose(decoded[:, 0], torch.full((4,), 0.7))
    mse_error = (decoded - weight).square().sum(dim=1)
    max_error = (_decode(codec, weight, weight.abs().amax()) - weight).square().sum(dim=1)
    assert torch.allclose(mse_error, torch.full((4,), 0.09), atol=1e-5)
    assert torch.allclose(max_error, torch.full((4,), 128 * (0.2 / 3) ** 2), atol=1e-4)


@pytest.mark.parametrize(
    "scheme",
    [
        LinearScheme.W4A16,
        LinearScheme.W4A16_ASYM,
        LinearScheme.W8A16,
        LinearScheme.INT8,
        LinearScheme.W4A16_MODELOPT,
        LinearScheme.NVFP4,
        LinearScheme.NVFP4_CT,
        LinearScheme.MXFP4,
        LinearScheme.FP8_DYNAMIC,
        LinearScheme.FP8_BLOCK,
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mse_never_loses_to_max_and_wins_at_4_bits_with_an_outlier(scheme, dtype):
    codec = codec_for(scheme)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 256, generator=g) * 0.02
    weight[::3, 7] = 0.5  # one outlier in every third row
    weight = weight.to(dtype)
    amax = weight.float().abs().amax()
    clipped, ratios = mse_clipped_weight(codec, weight, amax, MseOptions())
    assert clipped.dtype == dtype
    original = weight.float()
    mse_error = (_decode(codec, clipped, amax).float() - original).square().sum()
    max_error = (_decode(codec, weight, amax).float() - original).square().sum()
    assert mse_error <= max_error
    if codec.format.element in (Element.INT4, Element.E2M1):  # 4 bits: the outlier's groups are clipped
        assert mse_error < max_error
        assert ratios.min() < 1 and ratios.max() <= 1


def test_clipping_a_unit_is_quantizing_with_the_clipped_scale():
    """The codec given the clamped weight decodes exactly as a group scale computed from the clipped amax."""
    codec = codec_for(LinearScheme.W4A16)
    weight = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    clipped, ratios = mse_clipped_weight(codec, weight, weight.abs().amax(), MseOptions(min_ratio=0.6))
    groups = weight.reshape(8, 2, 128)
    scale = groups.abs().amax(dim=-1, keepdim=True) * ratios.reshape(8, 2, 1) / 7.5
    by_hand = (torch.clamp(torch.round(groups / scale), -8, 7) * scale).reshape(8, 256)
    assert torch.allclose(_decode(codec, clipped, weight.abs().amax()), by_hand, rtol=0, atol=1e-6)


def test_tensor_scale_is_searched_once_for_a_fused_group():
    codec = codec_for(LinearScheme.FP8)
    # FP8 steps are 1/8 of a power of two: with amax 1.06, the scale puts every 1.0 at 422.6 steps, between the
    # codes 416 and 448 (error 0.016 each); clipping amax to about 1.0 makes them exact for a small outlier error
    q, k = torch.ones(64, 128), torch.full((32, 128), 0.5)
    q[0, 0] = 1.06
    amax = q.abs().amax()
    (q_clipped, k_clipped), chosen = mse_tensor_amax(codec, [q, k], amax, MseOptions())
    assert chosen < amax
    assert chosen == torch.maximum(q_clipped.abs().amax(), k_clipped.abs().amax())
    error = sum(float((_decode(codec, c, chosen) - w).square().sum()) for c, w in ((q_clipped, q), (k_clipped, k)))
    baseline = sum(float((_decode(codec, w, amax) - w).square().sum()) for w in (q, k))
    assert error < baseline
    with pytest.raises(ValueError, match="no per-tensor weight scale"):
        mse_tensor_amax(codec_for(LinearScheme.W4A16), [q], amax, MseOptions())


def test_units_split_and_merge_are_inverse():
    weight = torch.arange(256 * 384, dtype=torch.float32).reshape(256, 384)
    for units, count in (
        (ScaleUnits(ScaleGranularity.GROUP, 128), 256 * 3),
        (ScaleUnits(ScaleGranularity.CHANNEL, None), 256),
        (ScaleUnits(ScaleGranularity.TENSOR, None), 1),
        (ScaleUnits(ScaleGranularity.BLOCK_2D, 128), 6),
    ):
        split = units.split(weight)
        assert split.shape[0] == count
        assert torch.equal(units.merge(split, (256, 384)), weight)
    tile = ScaleUnits(ScaleGranularity.BLOCK_2D, 128).split(weight)[1]  # rows 0-127, columns 128-255
    assert torch.equal(tile, weight[:128, 128:256].reshape(-1))


def test_options_are_checked():
    assert MseOptions(min_ratio=0.5, steps=2).ratios() == (1.0, 0.75, 0.5)
    with pytest.raises(InvalidArgumentError, match="min_ratio"):
        MseOptions(min_ratio=0)
    with pytest.raises(InvalidArgumentError, match="steps"):
        MseOptions(steps=0)
