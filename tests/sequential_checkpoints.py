"""Helpers of the layer-sequential tests: a tiny model saved as a checkpoint, and two checkpoints compared."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import quantport
from moe_models import VOCAB
from quantport.loading import load_model
from quantport.sequential import open_layer_by_layer
from tiny_models import make_calibration_batches


def whole_and_sequential(
    model_dir: Path, out: Path, recipe: str, fmt: str | None = None, **options
) -> tuple[Path, Path]:
    """The checkpoint of ``model_dir`` quantized whole, and layer by layer, with the same options."""
    options = {"progress": False, **options}
    batches = make_calibration_batches(vocab_size=VOCAB, n=3, batch=2, seq=16)
    whole, _ = load_model(model_dir, device="cpu", progress=False)
    quantport.quantize(whole, recipe, batches, format=fmt, **options)
    quantport.export(whole, out / "whole", fmt, progress=False)
    sequential = open_layer_by_layer(model_dir)
    quantport.quantize(sequential, recipe, batches, format=fmt, **options)
    quantport.export(sequential, out / "sequential", fmt, progress=False)
    return out / "whole", out / "sequential"


def differences(a: Path, b: Path) -> list[str]:
    """Files that differ between two checkpoints (the report's ``run`` section, which says how each ran, aside)."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names)
    found = []
    for name in names:
        if not (a / name).is_file() or not (b / name).is_file():
            found.append(f"{name}: only in one")
        elif name == "quantport_report.json":
            left, right = (json.loads((d / name).read_text()) for d in (a, b))
            left.pop("run"), right.pop("run")
            if left != right:
                found.append(f"{name}: {sorted(k for k in left if left[k] != right.get(k))}")
        elif not filecmp.cmp(a / name, b / name, shallow=False):
            found.append(name)
    return found
