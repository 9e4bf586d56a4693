"""The codec registry discovers every format's codecs on first look-up, whichever module is imported first."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import importlib, sys
importlib.import_module(sys.argv[1])
from quantport.recipes import LinearScheme
from quantport.schemes import CODECS, codec_for
assert len(CODECS) == len(LinearScheme), len(CODECS)
assert all(codec_for(s).scheme is s for s in LinearScheme)
"""


@pytest.mark.parametrize("first", ["quantport.formats.fp8", "quantport.formats.integer_ct", "quantport.check.specs"])
def test_a_format_module_imported_first_still_finds_every_codec(first):
    """A format module imports the codec protocol from quantport.schemes; discovery at that import would import
    the format's siblings while it is half-initialised (a sibling importing from it then fails)."""
    subprocess.run([sys.executable, "-c", PROBE, first], check=True, timeout=120)


def test_lookups_discover_the_codecs():
    from quantport.recipes import LinearScheme
    from quantport.schemes import CODECS

    assert set(CODECS) == set(LinearScheme) and LinearScheme.FP8 in CODECS
    assert {type(c).__module__ for c in CODECS.values()} >= {"quantport.formats.fp8", "quantport.formats.mx"}
