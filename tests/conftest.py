"""Shared fixtures: tiny dense models built from configs, fixed calibration batches."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import pytest
import torch

from tiny_models import TINY_MODELS, make_calibration_batches

logging.getLogger("modelopt").setLevel(logging.ERROR)

# A shell starts background jobs (`cmd &`, nohup) with SIGINT ignored, and children inherit that: the
# interrupt tests (Ctrl-C in-process and in child processes) would then test nothing and fail. Give the
# test process, and the children it starts, the SIGINT of an interactive run.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def tiny_model() -> Callable[..., torch.nn.Module]:
    """Factory: ``tiny_model("llama" | "qwen3", seed=0, **config_overrides)``."""
    return lambda family="llama", seed=0, **kw: TINY_MODELS[family](seed, **kw)


@pytest.fixture
def calib_batches() -> list[torch.Tensor]:
    return make_calibration_batches()
