"""Training metrics and progress: the one component that counts tokens, time and memory for every recipe.

`TrainingMonitor.log_step` writes a line of `metrics.jsonl` (on the main process) and moves the progress bar
(loss, tokens/s, ETA). Tokens/s means real (non-padding) tokens forwarded per second of training step, over all
processes; evaluation and checkpoint time are not training time (they are reported apart, in `wall_seconds`).
Every recipe reports speed through `summary()`, so SFT, DPO and GRPO figures are comparable.
"""

from __future__ import annotations

import sys
import time

import torch

from honellm.hardware import peak_rss_bytes
from honellm.progress import progress
from honellm.training.step import StepResult


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory of this process: allocated GPU memory on CUDA, peak resident set size (RSS) on CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


class TrainingMonitor:
    """Counts tokens and seconds of training, logs metrics, and shows a progress bar with tokens/s and ETA."""

    def __init__(self, run=None, *, total_steps: int, start_step: int = 0, is_main: bool = True,
                 device: torch.device | str | None = None, desc: str = "train"):
        self.run = run if is_main else None
        self.total_steps = total_steps
        self.device = device
        self.is_main = is_main
        self.train_seconds = 0.0
        self.train_tokens = 0
        self.units = 0
        self.steps = 0
        self.started = time.time()
        # CPU time of this process over the loop (steps, batching, logging; evaluations too when there are some):
        # on a shared machine it shows the compute a run used, which wall time hides behind other work.
        self.cpu_started = time.process_time()
        self.cpu_seconds = 0.0
        self._window: list[tuple[int, float]] = []
        self.bar = progress(total=total_steps, desc=desc, unit="step", disable=None if is_main else True,
                            initial=start_step)

    def log_step(self, step: int, result: StepResult, *, log: bool = True, postfix: dict | None = None,
                 **extra) -> None:
        """Count a finished step (1-based `step`) and, when `log`, write its metrics line.

        `postfix` adds fields to the progress bar after loss and tokens/s (e.g. an RL recipe's reward, an alarm).
        """
        self.train_seconds += result.seconds
        self.train_tokens += result.tokens
        now = time.process_time()
        self.cpu_seconds += now - self.cpu_started
        self.cpu_started = now
        self.units += result.units
        self.steps += 1
        self._window = [*self._window[-19:], (result.tokens, result.seconds)]
        recent = sum(t for t, _ in self._window) / max(1e-9, sum(s for _, s in self._window))
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{recent:.0f}", **(postfix or {}), refresh=False)
        if log and self.run is not None:
            self.run.log_metrics(step=step, loss=round(result.loss, 6), lr=result.lr,
                                 grad_norm=round(result.grad_norm, 6), tokens=result.tokens, units=result.units,
                                 tokens_per_second=round(recent, 1),
                                 **{k: round(v, 6) for k, v in result.metrics.items()}, **extra)

    def log(self, step: int, **values) -> None:
        """A free-form metrics line (evaluation results, events)."""
        if self.run is not None:
            self.run.log_metrics(step=step, **values)

    def note(self, text: str) -> None:
        """A line above the progress bar (quiet under HONE_QUIET=1 and on other processes)."""
        if self.is_main and not self.bar.disable:
            self.bar.write(f"hone: {text}", file=sys.stderr)

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def summary(self) -> dict:
        """The cost figures every recipe reports (they go into the artifact's manifest)."""
        return {
            "train_steps": self.steps,
            "train_seconds": round(self.train_seconds, 2),
            "train_tokens": self.train_tokens,
            "tokens_per_second": round(self.tokens_per_second, 1),
            "wall_seconds": round(time.time() - self.started, 2),
            "loop_cpu_seconds": round(self.cpu_seconds, 2),
            "peak_memory_bytes": peak_memory_bytes(self.device),
        }

    def state_dict(self) -> dict:
        """Totals carried across a resume, so the final figures cover the whole run."""
        return {"train_seconds": self.train_seconds, "train_tokens": self.train_tokens, "units": self.units,
                "steps": self.steps, "wall_seconds": time.time() - self.started, "cpu_seconds": self.cpu_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.train_tokens = int(state.get("train_tokens", 0))
        self.units = int(state.get("units", 0))
        self.steps = int(state.get("steps", 0))
        self.started = time.time() - float(state.get("wall_seconds", 0.0))
        self.cpu_seconds = float(state.get("cpu_seconds", 0.0))

    def out_of_time(self, max_seconds: float | None, step: int, accelerator=None) -> bool:
        """Whether the run has used its wall-clock budget (`max_seconds` since it started, resumes included).

        The main process decides and every process follows (one broadcast, only when a budget is set), so all
        of them stop after the same step. The first time it says yes it logs a `time_budget` event.
        """
        if max_seconds is None:
            return False
        over = time.time() - self.started >= max_seconds
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            flag = broadcast(torch.tensor([float(over)], device=accelerator.device), from_process=0)
            over = bool(flag.item() > 0)
        if over:
            self.bar.total = step
            self.bar.refresh()
            self.log(step, event="time_budget", max_seconds=max_seconds,
                     wall_seconds=round(time.time() - self.started, 2))
        return over

    def close(self) -> None:
        self.bar.close()
