"""Each dialect's names for a codec's pieces, and the shared tables export and load read."""

from __future__ import annotations

import torch

from quantport.dialects import compressed_tensors as ct
from quantport.dialects import modelopt, mxfp4_native
from quantport.formats.pieces import Piece
from quantport.recipes import LinearScheme
from quantport.schemes import codec_for

CT_NAMES = {
    LinearScheme.FP8: {"weight", "weight_scale", "input_scale"},
    LinearScheme.FP8_DYNAMIC: {"weight", "weight_scale"},
    LinearScheme.FP8_BLOCK: {"weight", "weight_scale"},
    LinearScheme.NVFP4_CT: {"weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"},
    LinearScheme.W4A16_NVFP4_CT: {"weight_packed", "weight_scale", "weight_global_scale"},
    LinearScheme.MXFP4: {"weight_packed", "weight_scale"},
    LinearScheme.INT8: {"weight", "weight_scale"},
    LinearScheme.W4A16: {"weight_packed", "weight_scale", "weight_shape"},
    LinearScheme.W4A16_ASYM: {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"},
    LinearScheme.W8A16: {"weight_packed", "weight_scale", "weight_shape"},
    LinearScheme.W8A16_ASYM: {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"},
}
"""compressed-tensors' tensor names per scheme (compressed-tensors' compressors and llm-compressor's output)."""


def _pieces(scheme: LinearScheme) -> set[Piece]:
    codec = codec_for(scheme)
    pieces = set(codec.weight_specs(64, 256))
    return pieces | {Piece.INPUT_SCALE} if codec.static_input_scale else pieces


def test_compressed_tensors_names_follow_from_each_row():
    assert set(CT_NAMES) <= set(ct.CT_SCHEMES)  # a format added later is its own test's
    modelopt_numerics = {LinearScheme.NVFP4, LinearScheme.W4A16_NVFP4, LinearScheme.W4A16_MODELOPT}
    assert not (modelopt_numerics | {LinearScheme.W8A16_MODELOPT, LinearScheme.MXFP8}) & set(ct.CT_SCHEMES)
    for scheme, names in CT_NAMES.items():
        row = ct.CT_SCHEMES[scheme]
        assert {row.suffix(piece) for piece in _pieces(scheme)} == names, scheme
        named = row.named_tensors({piece: torch.zeros(1) for piece in _pieces(scheme)})
        assert set(row.pieces_of({**named, "bias": torch.zeros(1)})) == _pieces(scheme)


def test_compressed_tensors_shapes():
    assert ct.ct_shape(Piece.GLOBAL_SCALE, (), 8) == (1,)
    assert ct.ct_shape(Piece.SCALE, (8,), 8) == (8, 1)
    assert ct.ct_shape(Piece.SCALE, (2, 1, 3, 1), 256) == (2, 3)
    assert ct.ct_shape(Piece.CODES, (8, 4), 8) == (8, 4)


def test_modelopt_names_and_algorithms():
    for scheme, algo in modelopt.MODELOPT_ALGOS.items():
        assert modelopt.scheme_for_algo(algo.quant_algo.lower()) is scheme
        names = {modelopt.linear_suffix(piece) for piece in _pieces(scheme)}
        assert names <= {"weight", "weight_scale", "weight_scale_2", "input_scale"} and "weight" in names
    assert modelopt.scheme_for_algo("MIXED_PRECISION") is None
    assert modelopt.fused_name("gate_up_proj", Piece.CODES) == "gate_up_proj"
    assert modelopt.fused_name("down_proj", Piece.GLOBAL_SCALE) == "down_proj_weight_scale_2"
    assert modelopt.pieces_of({"weight": torch.zeros(1), "bias": torch.zeros(1)}).keys() == {Piece.CODES}
    try:
        modelopt.linear_suffix(Piece.ZERO_POINT)
    except modelopt.UnknownPieceError as error:
        assert "zero_point" in str(error)
    else:
        raise AssertionError("ModelOpt has no zero point name")


def test_native_mxfp4_names():
    assert mxfp4_native.stored_name("gate_up_proj", Piece.CODES) == "gate_up_proj_blocks"
    assert mxfp4_native.stored_name("down_proj", Piece.SCALE) == "down_proj_scales"
    assert mxfp4_native.blocks_shape((4, 8, 2)) == (4, 8, 2, 16)


def test_every_codec_is_found_in_the_formats_package_without_an_import_line():
    import quantport.formats as formats
    from quantport.schemes.registry import CODECS

    registered = {type(codec).__module__.rsplit(".", 1)[1] for codec in CODECS.values()}
    assert registered >= {"fp8", "nvfp4", "mx", "integer_ct", "integer_modelopt"}
    assert all(type(codec).__module__.startswith(formats.__name__ + ".") for codec in CODECS.values())
    assert len(CODECS) == len(LinearScheme) >= 16
