"""Byte sizes as users write them."""

from __future__ import annotations

import pytest

from quantport.sizes import parse_size


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("123", 123),
        ("64kib", 64 * 1024),
        (" 1TB ", 10**12),
        (7, 7),
    ],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["lots", "0", "-5GB", "0.1B", "", "GB", True, 0])
def test_parse_size_refuses_what_is_not_a_positive_size(size):
    with pytest.raises(ValueError, match="size"):
        parse_size(size)
