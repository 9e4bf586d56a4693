"""Expert tensors gathered from stacks (export/expert_tensors.py gathered_bytes): whole experts in one
concatenation, any other selection tensor by tensor; both give the bytes of the tensors back to back."""

from __future__ import annotations

import torch

from quantport.export.expert_tensors import gathered_bytes
from quantport.formats.pieces import Piece


def _stacks() -> dict[str, dict[Piece, torch.Tensor]]:
    # experts 5, 6, 7: codes 2 x 3 uint8, scale 2 fp16 per expert, global scale one fp32 per expert
    return {
        "down": {
            Piece.CODES: torch.arange(18, dtype=torch.uint8).reshape(3, 2, 3),
            Piece.SCALE: torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float16),
            Piece.GLOBAL_SCALE: torch.tensor([0.5, 0.25, 0.125]),
        },
        "gate": {Piece.CODES: torch.arange(100, 106, dtype=torch.uint8).reshape(3, 2)},
    }


def _expected(stacks, wanted) -> torch.Tensor:
    return torch.cat([stacks[p][q][e - 5].reshape(-1).view(torch.uint8) for e, p, q in wanted])


def test_whole_experts_are_their_tensors_back_to_back():
    stacks = _stacks()
    order = [("down", Piece.GLOBAL_SCALE), ("down", Piece.CODES), ("gate", Piece.CODES), ("down", Piece.SCALE)]
    wanted = [(e, p, q) for e in (6, 7) for p, q in order]
    got = gathered_bytes(stacks, wanted, first=5)
    assert torch.equal(got, _expected(stacks, wanted))
    # expert 6 by hand: fp32 0.25 = 00 00 80 3e, codes 6..11, gate codes 102 103, fp16 3.0 = 00 42, 4.0 = 00 44
    assert got[:16].tolist() == [0, 0, 128, 62, 6, 7, 8, 9, 10, 11, 102, 103, 0, 66, 0, 68]
    assert got.numel() == 2 * 16


def test_a_cut_expert_is_gathered_tensor_by_tensor():
    stacks = _stacks()
    wanted = [(5, "gate", Piece.CODES), (6, "down", Piece.CODES), (6, "gate", Piece.CODES)]  # not whole experts
    assert torch.equal(gathered_bytes(stacks, wanted, first=5), _expected(stacks, wanted))
