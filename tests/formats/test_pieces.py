"""QuantizedPieces: a read-only mapping of the pieces present, keyed by typed roles."""

from __future__ import annotations

import pytest
import torch

from quantport.formats.pieces import Piece, QuantizedPieces


def _pieces() -> QuantizedPieces:
    return QuantizedPieces(torch.arange(4, dtype=torch.uint8), torch.tensor([0.5, 2.0]), global_scale=torch.tensor(3.0))


def test_only_present_pieces_are_keys_in_field_order():
    pieces = _pieces()
    assert list(pieces) == [Piece.CODES, Piece.SCALE, Piece.GLOBAL_SCALE]
    assert len(pieces) == 3 and Piece.ZERO_POINT not in pieces and pieces.get(Piece.SHAPE) is None
    assert pieces["scale"].tolist() == [0.5, 2.0]  # the role's value works as a key
    with pytest.raises(KeyError):
        pieces[Piece.ZERO_POINT]


def test_map_input_scale_and_of_round_trip():
    pieces = _pieces().with_input_scale(torch.tensor(7.0))
    assert list(pieces)[-1] is Piece.INPUT_SCALE and pieces[Piece.INPUT_SCALE].item() == 7.0
    doubled = pieces.map(lambda t: t * 2)
    assert doubled.codes.tolist() == [0, 2, 4, 6] and doubled.global_scale.item() == 6.0
    assert doubled.zero_point is None
    again = QuantizedPieces.of(dict(pieces))
    assert [(p, t.tolist()) for p, t in again.items()] == [(p, t.tolist()) for p, t in pieces.items()]
    assert QuantizedPieces.of(pieces) is pieces
    assert _pieces().with_input_scale(None).input_scale is None
