"""AdamW over the trainable parameters, and a warmup + decay learning-rate schedule.

The schedule is a pure function of the step (`lr_multiplier`), wrapped in a `LambdaLR` so that its position is
saved and restored with the checkpoint like any scheduler.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from honellm.errors import HoneError


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs that train, in the model's order (the optimizer and checkpoints rely on it)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW on the trainable parameters; weight decay applies to matrices only (not biases, norms, vectors).

    The fused kernel is used where torch has it for the device (one kernel for all parameters instead of a
    dozen small ops each: it matters for full fine-tuning, not for adapters).
    """
    params = trainable_parameters(model)
    if not params:
        raise HoneError("the model has no trainable parameters", fix="check the method's target modules")
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    device = params[0][1].device
    fused = device.type in ("cpu", "cuda") and all(p.dtype == torch.float32 for _, p in params)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    except (RuntimeError, TypeError):  # an older torch without the fused kernel for this device
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str = "cosine",
                  min_ratio: float = 0.0) -> float:
    """The learning rate at `step` (0-based, the step about to be taken) as a fraction of the peak.

    Linear warmup from 1/(warmup+1) to 1 over `warmup_steps`, then cosine or linear decay to `min_ratio` at
    `total_steps`, or constant.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        shape = 1.0 - progress
    elif schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * shape


def build_schedule(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                   schedule: str = "cosine", min_ratio: float = 0.0) -> LambdaLR:
    def multiplier(step: int) -> float:
        return lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule,
                             min_ratio=min_ratio)

    return LambdaLR(optimizer, multiplier)


def warmup_steps_for(total_steps: int, *, warmup_ratio: float, warmup_steps: int | None) -> int:
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    return int(round(total_steps * warmup_ratio))
