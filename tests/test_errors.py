"""Every error class quantport defines is a QuantportError, and invariants are not ``raise AssertionError``."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import quantport
from quantport.errors import InvalidArgumentError, QuantportError, UnsupportedExpertsError

SRC = Path(quantport.__file__).parent
OPTIONAL = {"quantport.report.coverage_plot", "quantport.eval_tasks", "quantport.kernels.triton_quant"}
"""Modules whose import needs an optional dependency; their classes are checked when it is installed."""


def _modules():
    for info in pkgutil.walk_packages([str(SRC)], prefix="quantport."):
        if info.name.endswith("__main__"):
            continue
        try:
            yield importlib.import_module(info.name)
        except ImportError:
            if info.name not in OPTIONAL:
                raise


def test_every_quantport_exception_is_a_quantport_error():
    found = {}
    for module in _modules():
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Exception) and value.__module__.startswith("quantport"):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    assert "quantport.read.json_files.StrictJSONError" in found
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, QuantportError))
    assert outside == []


def test_interrupt_is_a_keyboard_interrupt_not_an_error():
    from quantport.errors import InterruptedBySignal

    assert issubclass(InterruptedBySignal, KeyboardInterrupt) and not issubclass(InterruptedBySignal, Exception)


@pytest.mark.parametrize(
    "name",
    [
        "quantport.arch.experts.UnsupportedExpertsError",
        "quantport.read.json_files.StrictJSONError",
        "quantport.evaluate.EvalDataError",
    ],
)
def test_named_errors_are_quantport_errors(name):
    module, _, cls = name.rpartition(".")
    assert issubclass(getattr(importlib.import_module(module), cls), QuantportError)


def test_unclassifiable_experts_raise_a_quantport_error():
    from torch import nn

    from quantport.arch.experts import layout_for

    class OddExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.down_proj = nn.Parameter(__import__("torch").zeros(2, 4, 4))

    with pytest.raises(UnsupportedExpertsError, match="ExpertLayout") as info:
        layout_for("odd", OddExperts())
    assert isinstance(info.value, QuantportError)


def test_no_raise_assertion_error_in_the_package():
    offenders = [
        f"{path.relative_to(SRC)}:{n}"
        for path in SRC.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\braise AssertionError\b", line)
    ]
    assert offenders == []


def test_per_expert_policy_on_one_scale_family_is_refused_not_replaced():
    from moe_models import tiny_moe
    from tiny_models import make_calibration_batches

    with pytest.raises(InvalidArgumentError, match="per-expert is not possible for gpt_oss"):
        quantport.quantize(
            tiny_moe("gpt_oss"), "fp8", make_calibration_batches(256)[:1], moe_input_scales="per-expert", progress=False
        )
