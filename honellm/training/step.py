"""One optimizer step over a list of micro-batches: the one place where accumulation, clipping and the
non-finite check are done, for every recipe.

The loss of a step is the sum of the recipe's per-unit losses over the GLOBAL batch (all micro-batches on all
processes) divided by the global number of units. Each micro-batch's backward gets `total * world / units`; DDP
averages gradients over the `world` processes, which gives exactly sum/units, whatever the split. So one process
with grad_accum=4 and four processes with grad_accum=1 compute the same update (tested), and a micro-batch with
many answer tokens weighs more than one with few, as it would in one big batch.

On CPU the step hands the freed memory of earlier micro-batches back to the system (glibc's `malloc_trim`, tens
of milliseconds on a large heap) before a micro-batch larger than any before it. Without that the process's
resident memory grows over a run whose micro-batches change shape: each new shape leaves small long-lived
allocations behind (oneDNN's matmul primitives, PyTorch's flash-attention kernels, per sequence length), scattered
through glibc's heap among the freed activations; the freed holes between them stay resident, and are too small
for a longer micro-batch's tensors, which extend the heap instead. A DPO run on HH-RLHF peaked that way far above
what its tensors ever held at once (docs/reward.md). Only a new largest micro-batch can raise the peak, so the trim
runs there and not after every micro-batch (a few times per run, not a share of every step).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from honellm.errors import HoneError
from honellm.hardware import release_freed_memory
from honellm.training.logprobs import LossOutput
from honellm.training.precision import Precision


class NonFiniteLoss(HoneError):
    """The loss or the gradient norm became NaN or infinite; the weights were not updated."""


@dataclass
class StepResult:
    """What one optimizer step did, reduced over all processes."""

    loss: float  # mean loss per unit over the global batch
    units: int  # loss units (e.g. answer tokens) in the global batch
    tokens: int  # real (non-padding) tokens forwarded in the global batch: what tokens/s counts
    grad_norm: float  # before clipping
    lr: float  # the learning rate this step used
    seconds: float  # wall time of the step on this process
    metrics: dict[str, float] = field(default_factory=dict)  # the recipe's extra metrics, per unit


LossFn = Callable[[torch.nn.Module, object], LossOutput]


class TrainStep:
    """Forward + backward over micro-batches, then clip, check, step the optimizer and the schedule.

    `micro_batches` are objects with `num_tokens` and `num_loss_units` (e.g. `honellm.training.batching.Batch`)
    and a `to(device)` method; `loss_fn(model, batch) -> LossOutput` computes the recipe's loss.
    """

    def __init__(self, accelerator, model: torch.nn.Module, optimizer, schedule, *, precision: Precision,
                 max_grad_norm: float | None = 1.0):
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.precision = precision
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.largest = 0  # the largest micro-batch so far (padded tokens): a larger one trims the heap first (CPU)

    def __call__(self, micro_batches: Sequence, loss_fn: LossFn, *, step: int | None = None) -> StepResult:
        started = time.perf_counter()
        acc = self.accelerator
        world = acc.num_processes
        device = acc.device
        units = sum(b.num_loss_units for b in micro_batches)
        tokens = sum(b.num_tokens for b in micro_batches)
        if world > 1:
            local = torch.tensor([units, tokens], dtype=torch.float64, device=device)
            units, tokens = acc.reduce(local, reduction="sum").tolist()
        if units <= 0:
            raise HoneError("a training step has no token to learn from (every answer was masked or empty)",
                            fix="check the data: the target field must be non-empty")
        scale = world / units
        lr = self.optimizer.param_groups[0]["lr"]
        # Sums stay on the device until one transfer after clipping: on a GPU each read of a device value makes
        # the host wait for the device, and a step of a small model is bound by the host launching kernels.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        metric_sums: dict[str, float | torch.Tensor] = {}
        if not self.model.training:  # train() walks every module (~7 ms for a 135M model with LoRA)
            self.model.train()
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients on the last micro-batch only.
            sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
            if device.type == "cpu" and (size := _size(batch)) > self.largest:
                self.largest = size
                release_freed_memory()  # before the largest micro-batch yet: see the module docstring
            with sync:
                with self.precision.autocast():
                    out = loss_fn(self.model, batch.to(device))
                acc.backward(out.total * scale)
            loss_sum += out.total.detach().double()
            for key, value in out.metrics.items():
                value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
                metric_sums[key] = metric_sums.get(key, 0.0) + value
            del out
        keys = sorted(metric_sums)
        packed = torch.stack([loss_sum, *(torch.as_tensor(metric_sums[k], dtype=torch.float64, device=device)
                                          for k in keys)])
        if world > 1:
            packed = acc.reduce(packed, reduction="sum")
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        norm = acc.clip_grad_norm_(self.params, max_norm)
        norm = torch.as_tensor(norm, dtype=torch.float64).to(device).reshape(1)
        loss_total, *values, grad_norm = torch.cat([packed, norm]).tolist()
        metrics = {k: v / units for k, v in zip(keys, values, strict=True)}
        loss = loss_total / units
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise NonFiniteLoss(
                f"the training {what} became {loss if what == 'loss' else grad_norm}"
                + (f" at step {step + 1}" if step is not None else "") + "; the weights were not updated",
                fix=f"lower lr (now {lr:.3g}), keep max_grad_norm set, or use precision=fp32; "
                    "continue from the last good checkpoint with --resume")
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, int(units), int(tokens), grad_norm, lr, time.perf_counter() - started, metrics)


def _size(batch) -> int:
    """A micro-batch's padded size in tokens (what its activations scale with)."""
    ids = getattr(getattr(batch, "sequences", batch), "input_ids", None)  # a Batch, or one inside (PairBatch ...)
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else int(batch.num_tokens)
