"""QuantLinear: an ``nn.Linear`` converted in place to calibrate and simulate a Linear scheme.

Conversion swaps the instance's class, so parameters, names, hooks and state-dict keys are the
module's own: nothing is copied and ``model.state_dict()`` is unchanged.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.pieces import QuantizedPieces
from ..schemes import SchemeCodec
from .observe import SharedInputAmax, update_amax

__all__ = ["QuantLinear", "QuantMode"]


class QuantMode(str, Enum):
    """What a quantized module does in forward."""

    OFF = "off"
    """Plain full-precision forward."""
    CALIBRATE = "calibrate"
    """Full-precision forward that records the input amax."""
    SIMULATE = "simulate"
    """Forward with fake-quantized weights and activations, as the engine computes."""


class QuantLinear(nn.Linear):
    """A Linear layer with calibration statistics and fake quantization for one scheme.

    Attributes:
        codec: the scheme's codec.
        input_amax: fp32 0-d max |input| seen in calibration (group-unified), or None.
        shared_weight_amax: fp32 0-d weight amax shared by the layer's fused group, or None.
        mode: current :class:`QuantMode`.
        input_memo: the calibration run's :class:`SharedInputAmax` (set with the mode), or None.
    """

    codec: SchemeCodec
    input_amax: torch.Tensor | None
    shared_weight_amax: torch.Tensor | None
    mode: QuantMode
    input_memo: SharedInputAmax | None

    @classmethod
    def convert(cls, linear: nn.Linear, codec: SchemeCodec, weight_amax: torch.Tensor | None = None) -> QuantLinear:
        """Turn ``linear`` into a QuantLinear in place and return it.

        ``weight_amax``: the weight's fp32 0-d amax when the caller already computed it (saves a pass).
        """
        if type(linear) is not nn.Linear and not isinstance(linear, QuantLinear):
            # Subclasses with their own forward (e.g. routers) must not lose it silently.
            raise TypeError(f"cannot quantize {type(linear).__name__}: only plain nn.Linear is supported")
        linear.__class__ = cls
        linear.codec = codec
        linear.input_amax = None
        linear.shared_weight_amax = None
        linear._own_weight_amax = weight_amax
        linear.mode = QuantMode.OFF
        linear.input_memo = None
        linear._simulated_weight = None
        return linear  # type: ignore[return-value]

    def revert(self) -> nn.Linear:
        """Back to a plain ``nn.Linear`` (statistics are dropped)."""
        for attr in (
            "codec",
            "input_amax",
            "shared_weight_amax",
            "_own_weight_amax",
            "mode",
            "input_memo",
            "_simulated_weight",
        ):
            self.__dict__.pop(attr, None)
        self.__class__ = nn.Linear
        return self

    def weight_amax(self) -> torch.Tensor:
        """fp32 0-d per-tensor weight amax: the group's shared value when set, else this weight's own."""
        if self.shared_weight_amax is not None:
            return self.shared_weight_amax
        if self._own_weight_amax is None:
            self._own_weight_amax = update_amax(None, self.weight)
        return self._own_weight_amax

    def input_scale(self) -> torch.Tensor | None:
        """The exported ``input_scale`` (None for weight-only and dynamic schemes)."""
        if not self.codec.static_input_scale:
            return None
        if self.input_amax is None:
            raise RuntimeError("layer has no calibrated input amax; run calibration first")
        return self.codec.input_scale(self.input_amax)

    def quantized_tensors(self) -> QuantizedPieces:
        """This layer's quantized pieces (with the input scale of static schemes), named by each dialect
        at export; pure, the module is not changed."""
        pieces = self.codec.quantize_weight(self.weight.detach(), self.weight_amax())
        return pieces.with_input_scale(self.input_scale())

    def simulated_weight(self) -> torch.Tensor:
        """dequantize(quantize(weight)): exactly what the exported tensors decode to."""
        if self._simulated_weight is not None:
            return self._simulated_weight
        tensors = self.codec.quantize_weight(self.weight.detach(), self.weight_amax())
        return self.codec.dequantize_weight(tensors, self.weight.dtype)

    def cache_simulated_weight(self, enable: bool) -> None:
        """Keep the simulated weight in memory (faster repeated simulation, one weight copy)."""
        self._simulated_weight = None
        if enable:
            self._simulated_weight = self.simulated_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is QuantMode.CALIBRATE:
            if self.codec.static_input_scale:
                memo = self.input_memo
                self.input_amax = update_amax(self.input_amax, x) if memo is None else memo.update(self.input_amax, x)
            return F.linear(x, self.weight, self.bias)
        if self.mode is QuantMode.SIMULATE:
            x = self.codec.fake_quantize_input(x, self.input_scale())
            return F.linear(x, self.simulated_weight(), self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.codec.scheme.value}, mode={self.mode.value}"
