"""Peak memory of a piece of work: the RSS high-water mark on CPU, the allocator's peak on CUDA.

On Linux, writing "5" to /proc/self/clear_refs resets the process's RSS high-water mark (VmHWM), so the peak
measured is this evaluation's, not the whole process's; where that is not allowed the process-lifetime peak
(`ru_maxrss`) is reported and `memory_kind` says so.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


class PeakMemory:
    """`with PeakMemory(device) as meter: ...` then `meter.mb` and `meter.kind`."""

    def __init__(self, device=None):
        self.device = str(device) if device is not None else "cpu"
        self.mb: float | None = None
        self.kind = ""
        self._reset_ok = False

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._reset_ok = True
        except OSError:
            self._reset_ok = False
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            self.mb = torch.cuda.max_memory_allocated() / 2**20
            self.kind = "cuda_max_allocated"
            return
        high_water = _vm_hwm_kb() if self._reset_ok else None
        if high_water is not None:
            self.mb = high_water / 1024
            self.kind = "cpu_rss_high_water"
        else:
            # ru_maxrss is in kilobytes on Linux and bytes on macOS.
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.mb = peak / (2**20 if sys.platform == "darwin" else 1024)
            self.kind = "cpu_rss_high_water_process"


def _vm_hwm_kb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        return None
    return None
