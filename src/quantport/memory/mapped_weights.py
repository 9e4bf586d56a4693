"""Release memory-mapped checkpoint weights from the process once a layer is done with them.

transformers loads safetensors checkpoints as read-only memory maps: a weight becomes resident (and
counts in the process's RSS) when it is first touched, and stays resident. quantport touches each
layer once per calibration batch and once at export, so after a layer has run, its pages can be
dropped with ``madvise(MADV_DONTNEED)``; the next touch faults them back in from the page cache (or
from disk), unchanged. Peak memory is then about one layer of weights instead of the whole model.

Only pages of ``*.safetensors`` file mappings that hold no modified data are ever released: the
mapping's ``Anonymous`` counter in ``/proc/self/smaps`` (pages copied on write) must be zero, so every
resident page is a page of the file itself and dropping it loses nothing (quantport never writes to
weights). Elsewhere (other OSes, anonymous memory, tensors copied out of the mapping) this module does
nothing.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MappedWeights"]

logger = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True, slots=True)
class _Region:
    start: int
    end: int
    path: str


def _clean_safetensors_regions() -> list[_Region]:
    """Mappings of ``*.safetensors`` files whose resident pages are all unmodified file pages."""
    regions: list[_Region] = []
    current: _Region | None = None
    dirty = 0
    try:
        with open("/proc/self/smaps") as smaps:
            lines = list(smaps)
    except OSError:
        return []
    for line in [*lines, "end-end ---- 0 0 0 end\n"]:
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            if current is not None and dirty == 0:
                regions.append(current)
            current, dirty = None, 0
            if len(head) == 6 and head[5].strip().endswith(".safetensors") and head[1].startswith("r"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = _Region(start, end, head[5].strip())
        elif current is not None and head and head[0] == "Anonymous:":
            dirty += int(head[1])
    return regions


class MappedWeights:
    """The clean safetensors mappings of this process (found once, after the model is loaded), and a way
    to drop their resident pages."""

    def __init__(self, regions: list[_Region] | None = None) -> None:
        if regions is None:
            regions = _clean_safetensors_regions() if sys.platform.startswith("linux") else []
        self.regions = regions
        self._libc = ctypes.CDLL(None, use_errno=True) if self.regions else None
        if self.regions:
            self._libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        logger.debug("%d clean safetensors mappings", len(self.regions))

    @classmethod
    def disabled(cls) -> MappedWeights:
        """An instance that releases nothing."""
        return cls(regions=[])

    @property
    def active(self) -> bool:
        return bool(self.regions)

    def _madvise(self, start: int, end: int) -> None:
        start = (start + _PAGE - 1) // _PAGE * _PAGE  # only whole pages inside the range
        end = end // _PAGE * _PAGE
        if end > start:
            self._libc.madvise(start, end - start, _MADV_DONTNEED)

    def release_tensor(self, tensor: torch.Tensor) -> None:
        """Drop the resident pages of ``tensor`` if it lies inside a read-only safetensors mapping."""
        if not self.regions or tensor.device.type != "cpu" or tensor.numel() == 0:
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        for region in self.regions:
            if region.start <= start and end <= region.end:
                self._madvise(start, end)
                return

    def release_module(self, module: nn.Module) -> None:
        """Drop the resident pages of the module's own parameters and buffers."""
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            self.release_tensor(tensor)

    def release_all(self) -> None:
        """Drop every resident page of every read-only safetensors mapping."""
        for region in self.regions:
            self._madvise(region.start, region.end)

    def release_after_forward(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Forward hooks that release each module's weights once it has run; returns the handles."""
        if not self.regions:
            return []
        handles = []
        for module in model.modules():
            if any(True for _ in module.parameters(recurse=False)):
                handles.append(module.register_forward_hook(lambda m, args, out: self.release_module(m)))
        return handles
