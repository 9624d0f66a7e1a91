"""Peak memory of a piece of work: the RSS high-water mark on CPU, the allocator's peak on CUDA.

On Linux, writing "5" to /proc/self/clear_refs resets the process's RSS high-water mark (VmHWM), so the peak
measured is this evaluation's, not the whole process's; where that is not allowed the process-lifetime peak
is reported and `memory_kind` says so.
"""

from __future__ import annotations

from pathlib import Path

from honellm.hardware import peak_rss_bytes

# Work a method does to make its artifact besides its training steps (`train_seconds`): online RL's and RFT's
# rollouts and their scoring, the preference family's reference pass.
BESIDE_TRAINING = ("generation_seconds", "scoring_seconds", "reference_seconds")


def making_seconds(cost: dict | None, default: float = 0.0) -> float:
    """The seconds a method spent making its artifact, as the user pays them: its training steps and all the work
    `train_seconds` leaves out (`BESIDE_TRAINING`). A search's or a composition's cost records its whole total as
    `making_seconds`; `default` where the cost records no time at all."""
    cost = cost or {}
    if cost.get("making_seconds") is not None:
        return float(cost["making_seconds"])
    if cost.get("train_seconds") is None:
        return default
    return float(cost["train_seconds"]) + sum(float(cost.get(k) or 0.0) for k in BESIDE_TRAINING)


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
        self.mb = peak_rss_bytes() / 2**20
        self.kind = "cpu_rss_high_water" if self._reset_ok else "cpu_rss_high_water_process"
