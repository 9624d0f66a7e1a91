"""The training settings every recipe shares (SFT, DPO, GRPO, ...): schedule, batching, precision, checkpoints.

A recipe's config derives from `TrainingConfig` and adds its own fields, so `lr=1e-4 batch_size=4` means the
same thing in `hone tune` and `hone align`. Unknown keys are errors with the closest valid name suggested
(see `honellm.config`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from honellm.config import Config
from honellm.tracking import ReportTo, report_to_field


class TrainingConfig(Config):
    """Optimisation, batching, precision and bookkeeping shared by every training recipe."""

    # --- how long
    epochs: float = Field(3.0, gt=0, description="passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps to take (overrides epochs)")
    max_seconds: float | None = Field(
        None, gt=0, description="wall-clock budget: stop after the step that uses it up, evaluate and save as at the "
                                "planned end (the schedule keeps its planned length; `hone compare --budget` sets it)")
    # --- batching
    batch_size: int = Field(8, ge=1, description="examples per micro-batch on each device")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (global batch = batch_size x grad_accum x devices)")
    max_length: int = Field(1024, ge=8, description="longest sequence in tokens; longer examples lose the start of their prompt")
    # --- optimiser and schedule
    lr: float = Field(2e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (matrices only; biases, norms and vectors are not decayed)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="fraction of the steps spent warming up linearly from 0")
    warmup_steps: int | None = Field(None, ge=0, description="warmup steps (overrides warmup_ratio)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final learning rate as a fraction of lr (cosine and linear)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this (None: no clipping)")
    # --- numerics and memory
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 compute where the CPU/GPU does it fast (frozen weights bf16, trainable fp32), else fp32")
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="attention kernel: auto picks eager on CPU for sequences up to 256 tokens (its backward "
                            "is ~2x faster than the CPU flash kernel's there) and sdpa otherwise")
    compile: bool = Field(
        False, description="torch.compile each decoder layer (fuses norms, activations and adapter arithmetic; on a "
                           "GPU, fewer kernel launches) after a one-off compile of a minute or more, cached across "
                           "runs; on a CPU the direct LLaMA-family forward it replaces can be faster (docs/tuning.md)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% slower")
    memory_limit_gb: float | None = Field(
        None, gt=0, description="refuse to start when the estimated peak exceeds this (None: the memory available now)")
    # --- reproducibility and bookkeeping
    seed: int = Field(0, description="seeds adapter init, data order and dropout; the same seed gives the same weights")
    eval_every: int | None = Field(None, ge=0, description="steps between evaluations on validation (None: twice per epoch; 0: never)")
    save_every: int | None = Field(None, ge=0, description="steps between checkpoints (None: at every evaluation; 0: never)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on disk (oldest removed first)")
    log_every: int = Field(1, ge=1, description="steps between lines of metrics.jsonl")
    report_to: ReportTo = report_to_field()

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.max_steps is not None and self.warmup_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is longer than max_steps ({self.max_steps})")
        return self
