"""compressed-tensors' int32 packing of 4- and 8-bit codes, against compressed-tensors' own pack/unpack."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from quantport.formats.integer import pack_int_ct, unpack_int_ct


def test_8bit_packing_hand_vector():
    codes = torch.tensor([[-128, -1, 0, 127, 5]], dtype=torch.int8)
    packed = pack_int_ct(codes, 8)
    # offsets: 0, 127, 128, 255 -> 0xFF807F00 (as signed int32); 133 alone in the second word
    assert packed.tolist() == [[0xFF807F00 - 2**32, 133]]
    assert torch.equal(unpack_int_ct(packed, 8, 5), codes)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [-1, -2])
def test_packing_equals_compressed_tensors(bits, dim):
    generator = torch.Generator().manual_seed(bits)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
    codes = torch.randint(low, high, (24, 40), generator=generator, dtype=torch.int8)
    ours = pack_int_ct(codes, bits, dim=dim)
    theirs = pack_to_int32(codes, bits, packed_dim=0 if dim == -2 else 1)
    assert torch.equal(ours, theirs)
    length = codes.shape[dim]
    assert torch.equal(unpack_int_ct(ours, bits, length, dim=dim), codes)
    assert torch.equal(unpack_from_int32(theirs, bits, codes.shape, packed_dim=0 if dim == -2 else 1), codes)
