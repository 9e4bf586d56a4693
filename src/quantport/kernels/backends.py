"""Kernel backends: a name, a priority, a predicate saying which inputs they take, and their ops.

A call of an op goes to the registered backend of highest priority whose predicate accepts the input.
The pure-torch backend (``torch``, priority 0) accepts everything and defines the result; the Triton
backend (``triton``, priority 10) takes CUDA tensors of the dtypes and shapes its kernels cover, on
GPUs with FP8 conversion instructions (compute capability 8.9+), when Triton is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["BACKENDS", "Backend", "register_backend", "select", "use_backend"]


@dataclass(frozen=True, slots=True)
class Backend:
    """One implementation of the kernel ops.

    Attributes:
        name: short name (``torch``, ``triton``).
        priority: higher wins among the backends that accept an input.
        accepts: ``accepts(op, tensor, **arguments) -> bool``.
        load: ``load(op) -> callable`` (imports lazily, so a missing Triton costs nothing).
    """

    name: str
    priority: int
    accepts: Callable[..., bool]
    load: Callable[[str], Callable[..., object]]


BACKENDS: dict[str, Backend] = {}
_forced: list[str] = []


def register_backend(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


def select(op: str, tensor: torch.Tensor, **arguments: object) -> Backend:
    """The backend that runs ``op`` on ``tensor`` (the forced one inside :func:`use_backend`)."""
    if _forced:
        return BACKENDS[_forced[-1]]
    for backend in sorted(BACKENDS.values(), key=lambda b: -b.priority):
        if backend.accepts(op, tensor, **arguments):
            return backend
    raise LookupError(f"no backend for {op}")  # unreachable: the torch backend accepts everything


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every op on backend ``name`` inside the block (tests and benchmarks)."""
    if name not in BACKENDS:
        raise KeyError(f"unknown kernel backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _load_reference(op: str) -> Callable[..., object]:
    from . import reference

    return {
        "fp8_per_tensor": reference.fp8_per_tensor,
        "nvfp4": reference.nvfp4_quantize,
        "mxfp4": reference.mxfp4,
        "int4_modelopt": reference.int4_modelopt,
        "matrix_amax": reference.matrix_amax,
    }[op]


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


_TRITON_DTYPES = {
    "fp8_per_tensor": (torch.bfloat16, torch.float16, torch.float32),
    "nvfp4": (torch.bfloat16, torch.float16, torch.float32),
    # exponent from the bits equals the reference's ceil(log2(.)) for 8- and 11-bit mantissas only
    "mxfp4": (torch.bfloat16, torch.float16),
    "int4_modelopt": (torch.bfloat16, torch.float16, torch.float32),
    "matrix_amax": (torch.bfloat16, torch.float16, torch.float32),
}


def _triton_shape_ok(op: str, w: torch.Tensor, arguments: dict[str, object]) -> bool:
    """Shapes the kernels cover; anything else goes to the reference (which raises its own errors)."""
    if w.dim() < 1 or w.numel() == 0:
        return False
    k = w.shape[-1]
    if op == "nvfp4":
        g = torch.as_tensor(arguments.get("global_scale", 1.0))
        return k % 16 == 0 and (g.numel() == 1 or (w.dim() >= 3 and g.numel() == w.shape[:-2].numel()))
    if op == "mxfp4":
        return k % 32 == 0
    if op == "int4_modelopt":
        group = int(arguments.get("group", 128))
        return w.dim() >= 2 and k % group == 0 and group % 16 == 0 and w.shape[-2] % 2 == 0
    if op == "fp8_per_tensor":
        scale = torch.as_tensor(arguments.get("scale", 1.0))
        return scale.numel() == 1 or (w.dim() >= 3 and scale.numel() == w.shape[:-2].numel())
    return w.dim() >= int(arguments.get("matrix_dims", 2))


def _triton_accepts(op: str, w: torch.Tensor, **arguments: object) -> bool:
    if not (isinstance(w, torch.Tensor) and w.is_cuda and w.dtype in _TRITON_DTYPES[op]):
        return False
    if torch.cuda.get_device_capability(w.device) < (8, 9) or not _triton_installed():
        return False
    return _triton_shape_ok(op, w, arguments)


def _load_triton(op: str) -> Callable[..., object]:
    module = importlib.import_module("quantport.kernels.triton_quant")
    return {
        "fp8_per_tensor": module.fp8_per_tensor_triton,
        "nvfp4": module.nvfp4_triton,
        "mxfp4": module.mxfp4_triton,
        "int4_modelopt": module.int4_modelopt_triton,
        "matrix_amax": module.matrix_amax_triton,
    }[op]


register_backend(Backend("torch", 0, lambda op, w, **arguments: True, _load_reference))
register_backend(Backend("triton", 10, _triton_accepts, _load_triton))
