"""The package's public names: importable on first use, listed by ``dir()``, and those the README and docs/ show."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import quantport

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))

_PROBE = """
import json, sys
import quantport
before = sorted(m for m in ("torch", "transformers") if m in sys.modules)
listed = dir(quantport)
resolved = {name: type(getattr(quantport, name)).__name__ for name in quantport.__all__}
print(json.dumps({"before": before, "listed": listed, "resolved": resolved}))
"""


def _fresh_import() -> dict:
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_public_names_are_lazy_listed_and_resolve():
    probe = _fresh_import()
    assert probe["before"] == []  # importing quantport imports neither torch nor transformers
    assert set(quantport.__all__) <= set(probe["listed"])
    assert set(probe["resolved"]) == set(quantport.__all__)
    assert probe["resolved"]["quantize"] == probe["resolved"]["export"] == "function"
    assert probe["resolved"]["QuantportError"] == probe["resolved"]["CheckpointError"] == "type"
    assert probe["resolved"]["PRESETS"] == "dict"


def test_every_lazy_name_is_public_and_resolves_to_its_module():
    lazy = quantport._LAZY
    assert set(quantport.__all__) == set(lazy) | {"__version__"}
    for name, module in lazy.items():
        owner = importlib.import_module(f"quantport.{module}")
        assert getattr(quantport, name) is getattr(owner, name), name


def test_export_stays_the_function_after_the_export_package_is_imported():
    importlib.import_module("quantport.export.targets")
    assert callable(quantport.export)
    assert quantport.export is importlib.import_module("quantport.export").export


def test_checkpoint_error_is_a_quantport_error():
    assert issubclass(quantport.CheckpointError, quantport.QuantportError)


def test_names_the_readme_and_docs_show_are_public():
    text = "\n".join(path.read_text(encoding="utf-8") for path in DOCUMENTS)
    shown = set(re.findall(r"\bquantport\.([A-Za-z_]\w*)", text))
    shown |= {name for name in ("QuantportError", "CheckpointError", "PRESETS", "LinearScheme") if f"`{name}`" in text}
    assert {"quantize", "simulate", "export", "load"} <= shown
    for name in sorted(shown):
        if name in quantport.__all__:
            continue
        importlib.import_module(f"quantport.{name}")  # a submodule the README names (``quantport.read``)
