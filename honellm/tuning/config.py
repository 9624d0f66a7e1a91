"""The SFT recipe's settings: the shared training settings plus what supervised tuning adds.

Each tuning method's config derives from `SFTConfig` (see `honellm.tuning.methods`), adding the method's own
fields and its own defaults (a learning rate that suits it).
"""

from __future__ import annotations

from pydantic import Field

from honellm.training.config import TrainingConfig


class SFTConfig(TrainingConfig):
    """Supervised fine-tuning on the task's (prompt, answer) pairs."""

    completion_only_loss: bool = Field(True, description="take the loss on the answer only (False: on the prompt too)")
    select_best: bool = Field(True, description="keep the weights of the best validation evaluation, not the last")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many evaluations without improvement (None: never stop early)")
    eval_limit: int | None = Field(500, ge=1, description="validation records scored at each evaluation (None: all)")
    eval_batch_size: int = Field(16, ge=1, description="sequences per forward pass when scoring validation")
    packing: bool | None = Field(
        None, description="padding-free packing: each micro-batch's sequences end to end in one row, attention kept "
                          "inside each sequence (the same loss); None: on for CUDA GPUs with a varlen attention kernel "
                          "(flash-attention's, else PyTorch's own, torch 2.10+) and attention=auto, off otherwise "
                          "(sdpa would attend over the whole row under a mask; on a CPU it measured no faster, "
                          "bench/README.md)")
    cuda_graphs: bool = Field(
        False, description="CUDA graphs for the decoder layers (torch.compile mode reduce-overhead): each packed "
                           "micro-batch filled to exactly max_tokens_per_batch tokens, so every step replays one "
                           "recorded shape instead of launching each kernel (a small model's step is bound by "
                           "launches); CUDA only, with packing under a varlen kernel; compiles first (minutes)")
    max_tokens_per_batch: int | None = Field(
        None, ge=8, description="with packing, the token budget of one micro-batch (None: batch_size x the longest "
                                "training sequence); a global batch is cut into as many micro-batches as it needs")
