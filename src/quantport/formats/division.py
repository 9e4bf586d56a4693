"""Division by a constant that gives the same fp32 bits on every device.

``t / 448.0`` on a CUDA tensor is computed by PyTorch as ``t * fp32(1 / 448)`` (a Python-number divisor
becomes a multiplication by its reciprocal), which differs from the correctly rounded quotient the CPU
computes in the last bit for some inputs. Scales are written to checkpoints, so they must not depend on
where the model sits: dividing by a tensor holding the constant makes CUDA divide too (IEEE ``div.rn``).
"""

from __future__ import annotations

import torch

__all__ = ["divide"]


def divide(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x / divisor``, correctly rounded in ``x``'s dtype on the CPU and on CUDA alike."""
    return x / torch.full((), divisor, dtype=x.dtype, device=x.device)
