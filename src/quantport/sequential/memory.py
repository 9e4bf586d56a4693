"""Device and host memory in use while a model is quantized, and their peaks (for the progress bar and the
report)."""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

__all__ = ["MemoryPeaks", "host_rss_bytes"]


def host_rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/statm``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@dataclass
class MemoryPeaks:
    """Samples memory in use on ``device`` (CUDA: torch's allocator) and in the host process."""

    device: torch.device
    device_now: int = 0
    host_now: int = 0

    def __post_init__(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def sample(self) -> MemoryPeaks:
        if self.device.type == "cuda":
            self.device_now = torch.cuda.memory_allocated(self.device)
        self.host_now = host_rss_bytes()
        return self

    def postfix(self) -> str:
        device = f"{self.device.type} {self.device_now / 2**30:.1f} GiB, " if self.device.type == "cuda" else ""
        return f"{device}host {self.host_now / 2**30:.1f} GiB"

    def summary(self) -> dict[str, int | str]:
        """Peaks since this object was made: device allocator peak (CUDA only) and host peak RSS."""
        peaks: dict[str, int | str] = {"device": str(self.device), "peak_host_rss_bytes": _peak_rss_bytes()}
        if self.device.type == "cuda":
            peaks["peak_device_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return peaks
