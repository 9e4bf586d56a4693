"""How quantport takes over one module instance's forward, and gives it back.

One mechanism for every module whose computation quantport replaces (fused experts): the handler is
stored on the instance and becomes the instance's ``forward``; the class, the parameters and the
state-dict keys are untouched, and nothing is kept outside the module (no process-wide registry).
The class's own forward stays reachable with :func:`class_forward`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["attach_forward", "attached_forward", "class_forward", "detach_forward"]

_ATTR = "_quantport_forward"


def attach_forward(module: nn.Module, handler: Callable[..., Any]) -> None:
    """Route ``module``'s forward through ``handler`` (called with the module's own arguments)."""
    assert _ATTR not in module.__dict__, f"{type(module).__name__} already has a quantport forward attached"
    module.__dict__[_ATTR] = handler
    module.__dict__["forward"] = handler


def attached_forward(module: nn.Module) -> Callable[..., Any] | None:
    """The handler attached to ``module`` (None when quantport did not attach one)."""
    return module.__dict__.get(_ATTR)


def detach_forward(module: nn.Module) -> None:
    """Give ``module`` its class's forward back."""
    if module.__dict__.pop(_ATTR, None) is not None:
        module.__dict__.pop("forward", None)


def class_forward(module: nn.Module) -> Callable[..., Any]:
    """``module``'s forward as its class defines it, bound to ``module``."""
    return type(module).forward.__get__(module, type(module))
