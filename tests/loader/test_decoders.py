"""Every dialect the reader detects has a Linear decoder, found by discovery among the loader's modules."""

from __future__ import annotations

from quantport.loader import _DECODERS
from quantport.loader.compressed_tensors import CtDecoder
from quantport.loader.linear import NoQuantizedLinears
from quantport.loader.modelopt import ModelOptDecoder
from quantport.read.quant_config import Dialect


def test_every_known_dialect_has_its_decoder():
    assert set(_DECODERS) == set(Dialect) - {Dialect.UNKNOWN}
    assert isinstance(_DECODERS[Dialect.MODELOPT], ModelOptDecoder)
    assert isinstance(_DECODERS[Dialect.COMPRESSED_TENSORS], CtDecoder)
    assert isinstance(_DECODERS[Dialect.MXFP4], NoQuantizedLinears)
    assert isinstance(_DECODERS[Dialect.NONE], NoQuantizedLinears)
