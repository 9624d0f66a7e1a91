"""The training tail every recipe's loop shares: one optimizer step's aftermath, written once; and the set-up
before the loop (`start_training`: optimizer, schedule, the accelerator's wrapping, resume, monitor, step).

A recipe's loop reads top to bottom and calls the tail twice per step:

    training = start_training(accelerator, model, config, run, total_steps=T, resume=resume, ...)
    tail = training.tail(evaluate=..., eval_every=..., best=Best("val_accuracy"), save_every=...)
    while tail.running():
        batches = ...                                    # what the recipe feeds its step
        result = tail.step(train_step, batches, loss_fn)  # a non-finite loss becomes the user's HoneError
        if tail.end_step(result, **extra_metrics):        # count, budget, log, evaluate, keep the best, checkpoint
            break
    tail.finish(keep_best=config.select_best)              # the best weights back in

`end_step` does, in this order, what each recipe used to write for itself (SFT, the DPO family and KTO, the
reward model, GRPO / RLOO / online DPO, PPO, RFT):

1. the step count, and the wall-clock budget (`max_seconds`: the step that spends it is the last);
2. the step's metrics line (every `log_every` steps and at the last);
3. the evaluation callback every `eval_every` steps and at the last; its scores are logged as an `eval` event;
   whether they improve on the best is judged by `Best` (a score with its direction, ties broken by the
   validation loss) or by the recipe's own `judge` (the online recipes: the reward-hacking guard's gold signal);
   the best weights are written to `checkpoints/best.safetensors` (under FSDP every process gathers its shards);
   `patience` evaluations without improvement, or the judge's say-so, stop the run;
4. a checkpoint every `save_every` steps (never at the last step, nor at a stop: the artifact follows).

Why not a framework's trainer or callbacks (transformers' `Trainer`, accelerate has none): the recipes are flat
functions on purpose (docs/architecture.md), and what is shared here is a handful of decisions with exact
metrics.jsonl fields the UI and the tests read, not a training loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from honellm.errors import HoneError
from honellm.training.batching import LengthGroupedBatches
from honellm.training.checkpoint import Checkpointer, gather_trainable, is_fsdp, load_gathered, save_trainable
from honellm.training.monitor import TrainingMonitor
from honellm.training.optim import build_optimizer, build_schedule, warmup_steps_for
from honellm.training.run_folder import every
from honellm.training.step import NonFiniteLoss, StepResult, TrainStep

# ------------------------------------------------------------------------------------------------ state


@dataclass
class LoopState:
    """What the loop carries from step to step, saved in each checkpoint's state.json.

    `best_score` is the score `Best` judges by (a task metric, a preference accuracy), `best_loss` the validation
    loss of that evaluation; `bad_evals` counts evaluations without improvement (early stopping).
    """

    step: int = 0
    best_step: int | None = None
    best_score: float | None = None
    best_loss: float | None = None
    bad_evals: int = 0
    monitor: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict):
        data = dict(data)
        if "best_accuracy" in data and "best_score" not in data:  # state.json of an align run before the tail
            data["best_score"] = data.pop("best_accuracy")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Best:
    """Which evaluation is the best: a higher (or lower) `key`, ties broken by a lower `val_loss`; by the loss
    alone where the scores have no `key` (a task whose metric the recipe cannot compute during training)."""

    key: str
    higher_is_better: bool = True

    def improves(self, state: LoopState, scores: dict) -> bool:
        if state.best_step is None:
            return True
        score = scores.get(self.key)
        if score is not None and state.best_score is not None and score != state.best_score:
            return score > state.best_score if self.higher_is_better else score < state.best_score
        return scores["val_loss"] < state.best_loss

    def record(self, state: LoopState, scores: dict, step: int) -> None:
        state.best_step, state.best_score, state.best_loss = step, scores.get(self.key), scores["val_loss"]

    def kept(self, state: LoopState) -> dict:
        """The best evaluation's scores (for the artifact's metrics); empty before any evaluation."""
        if state.best_step is None:
            return {}
        return {k: v for k, v in ((self.key, state.best_score), ("val_loss", state.best_loss)) if v is not None}


# ------------------------------------------------------------------------------------------------ the tail


class TrainingTail:
    """Budget, logging, evaluation, best weights, early stop and checkpoints after each optimizer step.

    `evaluate(step) -> dict | None` scores the in-memory model; a dict is logged as the `eval` event (with
    `best_step`) and judged; None means the callback logged what it measured itself (the online recipes).
    `judge(step, scores) -> (best, stop)` replaces `Best` where something else decides (the guard).
    `checkpoints=None`: the run keeps no checkpoints (RFT). `always_keep_best`: write best.safetensors whatever
    `select_best` says (the online recipes restore it when the guard stops the run).
    """

    def __init__(self, *, accelerator, run, monitor: TrainingMonitor, state: LoopState, total_steps: int,
                 model=None, optimizer=None, schedule=None, checkpoints: Checkpointer | None = None,
                 log_every: int = 1, max_seconds: float | None = None, per_epoch: int | None = None,
                 evaluate: Callable[[int], dict | None] | None = None, eval_every: int = 0, best: Best | None = None,
                 judge: Callable[[int, dict | None], tuple[bool, bool]] | None = None, select_best: bool = True,
                 always_keep_best: bool = False, patience: int | None = None, save_every: int = 0,
                 best_file: str | Path | None = None):
        self.accelerator, self.run, self.monitor, self.state = accelerator, run, monitor, state
        self.total_steps = total_steps
        self.model, self.optimizer, self.schedule, self.checkpoints = model, optimizer, schedule, checkpoints
        self.log_every, self.max_seconds, self.per_epoch = log_every, max_seconds, per_epoch
        self.evaluate, self.eval_every, self.best, self.judge = evaluate, eval_every if evaluate else 0, best, judge
        self.keep_best_file = select_best or always_keep_best
        self.patience, self.save_every = patience, save_every
        self.best_file = Path(best_file) if best_file is not None else (
            checkpoints.folder / "best.safetensors" if checkpoints is not None else None)
        self.last_scores: dict | None = None
        self.out_of_time = False
        self.stopped = False

    def running(self) -> bool:
        """Whether the loop takes another step."""
        return not self.stopped and self.state.step < self.total_steps

    # ------------------------------------------------------------------------------------------ one step

    def step(self, train_step, micro_batches, loss_fn) -> StepResult:
        """`train_step(micro_batches, loss_fn)`; a non-finite loss or gradient ends the run with a HoneError that
        names the last good checkpoint (and a `non_finite_loss` event in metrics.jsonl)."""
        try:
            return train_step(micro_batches, loss_fn, step=self.state.step)
        except NonFiniteLoss as err:
            raise self.non_finite(err) from None

    def non_finite(self, err: NonFiniteLoss) -> HoneError:
        self.monitor.close()
        self.monitor.log(self.state.step + 1, event="non_finite_loss", message=err.what)
        if self.checkpoints is None:
            return HoneError(err.what, where=str(self.run.path), fix=err.fix)
        kept = self.checkpoints.latest()
        return HoneError(err.what, where=str(self.run.path),
                         fix=f"{err.fix}; the last good checkpoint is {kept}" if kept else
                         f"{err.fix}; no checkpoint was written yet (set save_every to keep some)")

    def end_step(self, result: StepResult, *, postfix: dict | None = None, **extra) -> bool:
        """Count the step, then budget, log, evaluate, keep the best, checkpoint (see the module docstring).

        `extra` fields go into the step's metrics line, `postfix` onto the progress bar. True: stop the loop.
        """
        state = self.state
        state.step += 1
        if self.monitor.out_of_time(self.max_seconds, state.step, self.accelerator):
            self.out_of_time = True
            self.total_steps = state.step  # the budget is spent: this step is the last (evaluate and save as at the end)
        last = state.step == self.total_steps
        if self.per_epoch is not None:
            extra = {"epoch": round(state.step / self.per_epoch, 4), **extra}
        self.monitor.log_step(state.step, result, log=state.step % self.log_every == 0 or last, postfix=postfix,
                              **extra)
        if self.eval_every and (state.step % self.eval_every == 0 or last):
            self.stopped = self.evaluate_now(state.step)
        if (self.save_every and self.checkpoints is not None and state.step < self.total_steps and not self.stopped
                and state.step % self.save_every == 0):
            self.save_checkpoint()
        return self.stopped

    def evaluate_now(self, step: int) -> bool:
        """Run the evaluation callback at `step`, judge it, keep the best weights; True when the run should stop.

        Also what a recipe calls before its first step where the starting weights are a candidate (the online
        recipes' baseline check)."""
        state = self.state
        scores = self.evaluate(step)
        if self.judge is not None:
            better, stop = self.judge(step, scores)
            if better:
                state.best_step = step
        else:
            better = self.best.improves(state, scores)
            if better:
                self.best.record(state, scores, step)
                state.bad_evals = 0
            else:
                state.bad_evals += 1
            stop = bool(self.patience and state.bad_evals >= self.patience)
        if better and self.keep_best_file and self.best_file is not None:
            tensors = gather_trainable(self.accelerator, self.model)  # every process takes part under FSDP
            if self.accelerator.is_main_process:
                save_trainable(self.best_file, tensors)
            if is_fsdp(self.accelerator):
                self.accelerator.wait_for_everyone()
        if scores is not None:
            self.last_scores = scores
            self.monitor.log(step, event="eval", **scores, best_step=state.best_step)
            self.monitor.note(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if stop and self.judge is None:
            self.monitor.log(step, event="early_stop", evals_without_improvement=state.bad_evals)
        return stop

    def save_checkpoint(self) -> None:
        self.state.monitor = self.monitor.state_dict()
        self.checkpoints.save(self.state.step, model=self.model, optimizer=self.optimizer, schedule=self.schedule,
                              state=self.state.to_dict())

    # ------------------------------------------------------------------------------------------ the end

    def finish(self, *, keep_best: bool) -> int:
        """Close the progress bar, wait for every process, and put the best evaluation's weights back when
        `keep_best` and they are not the last ones; return the step whose weights the model now holds."""
        self.monitor.close()
        self.accelerator.wait_for_everyone()
        state = self.state
        if not keep_best or state.best_step is None:
            return state.step
        if state.best_step != state.step and self.best_file is not None and self.best_file.exists():
            from safetensors.torch import load_file

            main = self.accelerator.is_main_process
            tensors = load_file(self.best_file) if main or not is_fsdp(self.accelerator) else None
            load_gathered(self.accelerator, self.model, tensors, where=str(self.best_file))
        return state.best_step


# ------------------------------------------------------------------------------------------------ the set-up


@dataclass(frozen=True)
class StepPlan:
    """The loop's schedule: the batch sampler, steps per epoch and in all, steps between evaluations and
    checkpoints (0: never)."""

    sampler: LengthGroupedBatches
    per_epoch: int
    total_steps: int
    eval_every: int
    save_every: int


def plan_steps(lengths: list[int], config, *, world: int, validating: bool, where: str,
               what: str = "training examples") -> StepPlan:
    """Global batches of `config.batch_size x grad_accum x world` examples grouped by length (`lengths`: each
    example's), `max_steps` or `epochs` of them, an evaluation every `eval_every` steps when `validating` and a
    checkpoint every `save_every` (both default to twice per epoch; checkpoints follow the evaluations). Too few
    examples to fill one step's micro-batches is a HoneError at `where`."""
    slots = world * config.grad_accum
    if len(lengths) < slots:
        raise HoneError(f"{len(lengths)} {what} cannot fill {slots} micro-batches", where=where,
                        fix="add training data, or lower grad_accum / the number of processes")
    sampler = LengthGroupedBatches(lengths, config.batch_size * slots, seed=config.seed, slots=slots)
    per_epoch = sampler.steps_per_epoch
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    eval_every = every(config.eval_every, per_epoch) if validating else 0
    save_every = every(config.save_every, per_epoch) if config.save_every is not None else (
        eval_every or every(None, per_epoch))
    return StepPlan(sampler, per_epoch, total_steps, eval_every, save_every)



@dataclass
class Training:
    """What `start_training` set up: the wrapped model and optimizer, the schedule, the checkpointer, the loop's
    state (restored when resuming), the monitor and the optimizer step."""

    accelerator: Any
    run: Any
    config: Any
    total_steps: int
    model: Any
    optimizer: Any
    schedule: Any
    checkpoints: Checkpointer
    state: LoopState
    monitor: TrainingMonitor
    step: TrainStep
    resumed_from: Path | None

    def tail(self, **kwargs) -> TrainingTail:
        """The loop's `TrainingTail` over these pieces (`kwargs`: evaluation, best, checkpoint schedule, ...)."""
        return TrainingTail(accelerator=self.accelerator, run=self.run, monitor=self.monitor, state=self.state,
                            total_steps=self.total_steps, model=self.model, optimizer=self.optimizer,
                            schedule=self.schedule, checkpoints=self.checkpoints, log_every=self.config.log_every,
                            max_seconds=self.config.max_seconds, **kwargs)


def start_training(accelerator, model, config, run, *, total_steps: int, resume: bool, precision, desc: str,
                   schedule_steps: int | None = None, state_type: type[LoopState] = LoopState) -> Training:
    """AdamW and its warmup-then-decay schedule over `schedule_steps` optimizer updates (default: `total_steps`),
    the model and optimizer wrapped by the accelerator, the checkpointer, the loop's state (from the latest
    checkpoint when `resume`: weights, optimizer, schedule and random states), the monitor and the `TrainStep`:
    what every recipe sets up the same way before its loop (`config` is a `TrainingConfig`)."""
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
    updates = schedule_steps if schedule_steps is not None else total_steps
    warmup = warmup_steps_for(updates, warmup_ratio=config.warmup_ratio, warmup_steps=config.warmup_steps)
    schedule = build_schedule(optimizer, total_steps=updates, warmup_steps=warmup, schedule=config.schedule,
                              min_ratio=config.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpoints = Checkpointer(run.path / "checkpoints", keep=config.keep_checkpoints, accelerator=accelerator)
    state = state_type()
    latest = checkpoints.latest() if resume else None
    if latest is not None:
        state = state_type.from_dict(checkpoints.restore(latest, model=model, optimizer=optimizer, schedule=schedule))
    monitor = TrainingMonitor(run, total_steps=total_steps, start_step=state.step,
                              is_main=accelerator.is_main_process, device=accelerator.device, desc=desc)
    monitor.load_state_dict(state.monitor)
    step = TrainStep(accelerator, model, optimizer, schedule, precision=precision, max_grad_norm=config.max_grad_norm)
    return Training(accelerator, run, config, total_steps, model, optimizer, schedule, checkpoints, state, monitor,
                    step, latest)
