"""Numeric-format descriptors: typed capabilities, one per codec, and no checkpoint vocabulary."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quantport.formats.descriptors import (
    ActivationQuant,
    Element,
    NumericFormat,
    ScaleConvention,
    ScaleGranularity,
    ScaleType,
)
from quantport.recipes import LinearScheme
from quantport.schemes import CODECS, codec_for

EXPECTED = {
    # scheme: (activations, stacks, input_multiple, group_size, shared_weight_amax, convention)
    "fp8": (ActivationQuant.STATIC, True, 1, None, False, None),
    "fp8-dynamic": (ActivationQuant.DYNAMIC, False, 1, None, False, None),
    "fp8-block": (ActivationQuant.NONE, False, 128, None, False, None),
    "nvfp4": (ActivationQuant.STATIC, True, 16, 16, True, ScaleConvention.MULTIPLIER),
    "w4a16-nvfp4": (ActivationQuant.NONE, True, 16, 16, True, ScaleConvention.MULTIPLIER),
    "nvfp4-ct": (ActivationQuant.STATIC, False, 16, 16, True, ScaleConvention.DIVISOR),
    "w4a16-nvfp4-ct": (ActivationQuant.NONE, False, 16, 16, True, ScaleConvention.DIVISOR),
    "mxfp8": (ActivationQuant.DYNAMIC, True, 32, 32, False, None),
    "mxfp4": (ActivationQuant.NONE, True, 32, 32, False, None),
    "int8": (ActivationQuant.DYNAMIC, False, 1, None, False, ScaleConvention.HALF_STEP_MODEL_DTYPE),
    "w4a16": (ActivationQuant.NONE, False, 128, 128, False, ScaleConvention.HALF_STEP_MODEL_DTYPE),
    "w4a16-asym": (ActivationQuant.NONE, False, 128, 128, False, ScaleConvention.HALF_STEP_MODEL_DTYPE),
    "w8a16": (ActivationQuant.NONE, False, 128, 128, False, ScaleConvention.HALF_STEP_MODEL_DTYPE),
    "w8a16-asym": (ActivationQuant.NONE, False, 128, 128, False, ScaleConvention.HALF_STEP_MODEL_DTYPE),
    "w4a16-modelopt": (ActivationQuant.NONE, True, 128, 128, False, ScaleConvention.RESTRICTED_FP32),
    "w8a16-modelopt": (ActivationQuant.NONE, True, 1, None, False, ScaleConvention.RESTRICTED_FP32),
}


def test_every_scheme_has_its_expected_capabilities():
    compared = 0
    for value in EXPECTED:
        scheme = LinearScheme(value)
        codec = codec_for(scheme)
        fmt = codec.format
        assert isinstance(fmt, NumericFormat)
        got = (fmt.activations, fmt.stacks, fmt.input_multiple, fmt.group_size, fmt.shared_weight_amax, fmt.convention)
        assert got == EXPECTED[scheme.value], scheme
        assert codec.static_input_scale is fmt.needs_calibration is (fmt.activations is ActivationQuant.STATIC)
        assert codec.input_multiple == fmt.input_multiple and codec.group_size == fmt.group_size
        compared += 1
    assert compared == len(EXPECTED) == 16 and len(CODECS) == len(LinearScheme)


def test_codecs_carry_no_dialect_vocabulary():
    for codec in CODECS.values():
        names = {f.name for f in dataclasses.fields(codec)}
        assert names <= {"scheme", "format"}, (codec.scheme, names)
        assert not hasattr(codec, "modelopt_algo")


def test_asymmetric_formats_say_so():
    assert codec_for(LinearScheme.W4A16_ASYM).format.symmetric is False
    assert codec_for(LinearScheme.W4A16).format.symmetric is True
    assert codec_for(LinearScheme.W4A16_ASYM).format.element is Element.INT4
    assert codec_for(LinearScheme.W8A16_ASYM).format.element is Element.INT8


def test_scale_encodings():
    assert codec_for(LinearScheme.MXFP4).format.scale_type is ScaleType.E8M0
    assert codec_for(LinearScheme.MXFP4).format.scale_dtype == torch.uint8
    assert codec_for(LinearScheme.NVFP4).format.scale_dtype == torch.float8_e4m3fn
    assert codec_for(LinearScheme.W4A16).format.scale_dtype is None  # the weight's dtype
    assert codec_for(LinearScheme.W4A16_MODELOPT).format.scale_dtype == torch.float32
    assert codec_for(LinearScheme.FP8_BLOCK).format.granularity is ScaleGranularity.BLOCK_2D


def test_weight_only_input_scale_is_refused_not_probed():
    codec = codec_for(LinearScheme.W4A16)
    assert codec.format.activations is ActivationQuant.NONE
    with pytest.raises(TypeError, match="no static input scale"):
        codec.input_scale(torch.tensor(1.0))


def test_descriptor_validation():
    with pytest.raises(ValueError, match="block_size"):
        NumericFormat("bad", Element.INT8, ScaleGranularity.GROUP, None, ScaleType.FLOAT, None, ActivationQuant.NONE)
    with pytest.raises(ValueError, match="input_multiple"):
        NumericFormat(
            "bad", Element.INT8, ScaleGranularity.TENSOR, None, ScaleType.FLOAT, None, ActivationQuant.NONE,
            input_multiple=0,
        )  # fmt: skip
    fmt = codec_for(LinearScheme.FP8).format
    with pytest.raises(dataclasses.FrozenInstanceError):
        fmt.stacks = False  # type: ignore[misc]


def test_a_scheme_names_exactly_one_numeric_format():
    """LinearScheme is one concept: every member names one descriptor and no two members share one, so a
    scheme's name never stands for how a dialect stores the same numbers."""
    formats = [codec_for(scheme).format for scheme in LinearScheme]
    assert len(set(formats)) == len(formats) == len(LinearScheme) >= 16
    nvfp4, nvfp4_ct = codec_for(LinearScheme.NVFP4).format, codec_for(LinearScheme.NVFP4_CT).format
    assert dataclasses.replace(nvfp4_ct, convention=ScaleConvention.MULTIPLIER, stacks=True) == nvfp4


def test_two_level_scales_are_the_fp8_scaled_formats():
    two_level = {scheme.value for scheme in LinearScheme if codec_for(scheme).format.global_scale}
    assert two_level == {"nvfp4", "w4a16-nvfp4", "nvfp4-ct", "w4a16-nvfp4-ct"}
