"""Shared fixtures: tiny dense models built from configs, fixed calibration batches."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

from tiny_models import TINY_MODELS, make_calibration_batches

logging.getLogger("modelopt").setLevel(logging.ERROR)


@pytest.fixture
def tiny_model() -> Callable[..., torch.nn.Module]:
    """Factory: ``tiny_model("llama" | "qwen3", seed=0, **config_overrides)``."""
    return lambda family="llama", seed=0, **kw: TINY_MODELS[family](seed, **kw)


@pytest.fixture
def calib_batches() -> list[torch.Tensor]:
    return make_calibration_batches()
