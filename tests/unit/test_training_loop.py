"""The training tail every recipe shares (honellm.training.loop): when it evaluates, which evaluation is the best
and in which direction, early stopping, checkpoints, the time budget, a non-finite loss, and the best weights put
back at the end. On a one-parameter model and scripted scores: the recipes' own runs are in their test files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from honellm.errors import HoneError
from honellm.training.checkpoint import Checkpointer
from honellm.training.loop import Best, LoopState, TrainingTail
from honellm.training.memory import GiB, MemoryEstimate, fit_micro_batch
from honellm.training.monitor import TrainingMonitor
from honellm.training.optim import build_optimizer, build_schedule
from honellm.training.setup import setup_accelerator
from honellm.training.step import NonFiniteLoss, StepResult


class Run:
    def __init__(self, path: Path):
        self.path = path
        self.lines: list[dict] = []

    def log_metrics(self, **values):
        self.lines.append(values)

    def events(self, name: str) -> list[dict]:
        return [line for line in self.lines if line.get("event") == name]


def _tail(tmp_path, scores: list[dict] | None, *, total_steps=6, eval_every=2, save_every=0, patience=None,
          best=None, select_best=True, max_seconds=None):
    """A tail over a one-weight model whose weight is set to the step number at each step (so the weights say
    which step they are from); `scores[k]` is what the k-th evaluation returns."""
    accelerator = setup_accelerator()
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = build_optimizer(model, lr=0.1)
    schedule = build_schedule(optimizer, total_steps=total_steps, warmup_steps=0, schedule="constant")
    run = Run(tmp_path)
    monitor = TrainingMonitor(run, total_steps=total_steps, desc="test")
    evaluations = iter(scores or [])
    tail = TrainingTail(accelerator=accelerator, run=run, monitor=monitor, state=LoopState(), total_steps=total_steps,
                        model=model, optimizer=optimizer, schedule=schedule,
                        checkpoints=Checkpointer(tmp_path / "checkpoints", keep=10, accelerator=accelerator),
                        max_seconds=max_seconds, evaluate=(lambda step: next(evaluations)) if scores else None,
                        eval_every=eval_every, best=best or Best("val_accuracy"), select_best=select_best,
                        patience=patience, save_every=save_every)
    return tail, model, run


def _step(tail, model) -> StepResult:
    with torch.no_grad():
        model.weight.fill_(tail.state.step + 1)
    return StepResult(loss=1.0, units=1, tokens=4, grad_norm=0.1, lr=0.1, seconds=0.01)


def _train(tail, model) -> None:
    while tail.running():
        if tail.end_step(_step(tail, model)):
            break


def test_it_evaluates_every_n_steps_and_at_the_last_and_keeps_the_best_weights(tmp_path):
    scores = [{"val_loss": 1.0, "val_accuracy": 0.5}, {"val_loss": 0.9, "val_accuracy": 0.75},
              {"val_loss": 0.8, "val_accuracy": 0.6}, {"val_loss": 0.7, "val_accuracy": 0.6}]
    tail, model, run = _tail(tmp_path, scores, total_steps=7, eval_every=3)
    _train(tail, model)
    assert [e["step"] for e in run.events("eval")] == [3, 6, 7]  # every 3 steps, and the last
    assert [e["best_step"] for e in run.events("eval")] == [3, 6, 6]
    assert (tail.state.best_step, tail.state.best_score, tail.state.best_loss) == (6, 0.75, 0.9)
    assert model.weight.item() == 7
    assert tail.finish(keep_best=True) == 6 and model.weight.item() == 6  # the best step's weights are back
    assert Best("val_accuracy").kept(tail.state) == {"val_accuracy": 0.75, "val_loss": 0.9}


def test_the_direction_ties_and_a_missing_score_decide_the_best():
    state = LoopState(best_step=1, best_score=0.5, best_loss=1.0)
    lower = Best("val_perplexity", higher_is_better=False)
    assert lower.improves(state, {"val_perplexity": 0.4, "val_loss": 2.0})
    assert not lower.improves(state, {"val_perplexity": 0.6, "val_loss": 0.1})
    higher = Best("val_accuracy")
    assert higher.improves(state, {"val_accuracy": 0.5, "val_loss": 0.9})  # a tie: the lower loss wins
    assert not higher.improves(state, {"val_accuracy": 0.5, "val_loss": 1.1})
    assert higher.improves(state, {"val_loss": 0.9}) and not higher.improves(state, {"val_loss": 1.2})
    assert higher.improves(LoopState(), {"val_loss": 9.0})  # the first evaluation is the best so far
    # an align run's state.json from before the tail resumes with its best accuracy
    assert LoopState.from_dict({"step": 4, "best_accuracy": 0.8, "best_step": 2, "other": 1}).best_score == 0.8


def test_patience_stops_the_run_without_a_checkpoint_at_the_stop(tmp_path):
    scores = [{"val_loss": 1.0, "val_accuracy": 0.5}] + [{"val_loss": 2.0, "val_accuracy": 0.4}] * 5
    tail, model, run = _tail(tmp_path, scores, total_steps=12, eval_every=1, save_every=3, patience=2)
    _train(tail, model)
    assert tail.state.step == 3 and run.events("early_stop")[0]["evals_without_improvement"] == 2
    assert tail.checkpoints.steps() == []  # step 3 would have been a checkpoint, but the run stopped there
    assert tail.finish(keep_best=True) == 1 and model.weight.item() == 1


def test_checkpoints_every_n_steps_but_never_at_the_last(tmp_path):
    tail, model, run = _tail(tmp_path, None, total_steps=6, save_every=2)
    _train(tail, model)
    assert [step for step, _ in tail.checkpoints.steps()] == [2, 4]
    assert [line["step"] for line in run.lines if "loss" in line] == [1, 2, 3, 4, 5, 6]
    assert tail.finish(keep_best=True) == 6  # no evaluation: the last weights


def test_without_select_best_the_last_weights_stay_and_no_best_file_is_written(tmp_path):
    scores = [{"val_loss": 1.0, "val_accuracy": 0.9}, {"val_loss": 1.0, "val_accuracy": 0.1}]
    tail, model, run = _tail(tmp_path, scores, total_steps=2, eval_every=1, select_best=False)
    _train(tail, model)
    assert tail.state.best_step == 1 and not (tmp_path / "checkpoints" / "best.safetensors").exists()
    assert tail.finish(keep_best=False) == 2 and model.weight.item() == 2
    assert tail.last_scores == scores[1]


def test_the_step_that_spends_the_time_budget_is_the_last_and_is_evaluated(tmp_path):
    scores = [{"val_loss": 1.0, "val_accuracy": 0.5}] * 2
    tail, model, run = _tail(tmp_path, scores, total_steps=100, eval_every=50, max_seconds=3600)
    tail.end_step(_step(tail, model))
    tail.max_seconds = 0  # spent by the next step (no clock in the test)
    _train(tail, model)
    assert tail.out_of_time and tail.state.step == 2 and tail.total_steps == 2
    assert run.events("time_budget")[0]["step"] == 2 and [e["step"] for e in run.events("eval")] == [2]


def test_a_non_finite_loss_is_a_user_error_naming_the_last_good_checkpoint(tmp_path):
    tail, model, run = _tail(tmp_path, None, total_steps=10, save_every=2)
    for _ in range(3):
        tail.end_step(_step(tail, model))

    def failing(micro_batches, loss_fn, *, step):
        raise NonFiniteLoss(f"the training loss became nan at step {step + 1}", fix="lower lr")

    with pytest.raises(HoneError) as info:
        tail.step(failing, [], None)
    assert "at step 4" in info.value.what and "step-000002" in info.value.fix and "lower lr" in info.value.fix
    assert info.value.where == str(tmp_path)
    assert run.lines[-1]["event"] == "non_finite_loss" and run.lines[-1]["step"] == 4


def test_a_judge_decides_the_best_and_the_stop(tmp_path):
    accelerator = setup_accelerator()
    model = torch.nn.Linear(1, 1, bias=False)
    run = Run(tmp_path)
    verdicts = {2: (True, False), 4: (False, True)}
    tail = TrainingTail(accelerator=accelerator, run=run, monitor=TrainingMonitor(run, total_steps=8), model=model,
                        state=LoopState(), total_steps=8, evaluate=lambda step: None, eval_every=2,
                        judge=lambda step, scores: verdicts[step], select_best=False, always_keep_best=True,
                        best_file=tmp_path / "best.safetensors")
    _train(tail, model)
    assert tail.state.step == 4 and tail.state.best_step == 2 and (tmp_path / "best.safetensors").exists()
    assert run.events("eval") == [] and run.events("early_stop") == []  # the judge logs what it measured
    assert tail.finish(keep_best=True) == 2 and model.weight.item() == 2


# ------------------------------------------------------------------------------------------------ memory


def _per_sequence(batch: int, length: int, checkpointing: bool) -> MemoryEstimate:
    """1 GiB per sequence, half that with gradient checkpointing."""
    size = batch * GiB // (2 if checkpointing else 1)
    return MemoryEstimate(0, 0, 0, size, 0, 0, batch, length, checkpointing)


def test_fit_micro_batch_takes_a_smaller_micro_batch_then_checkpointing():
    kwargs = {"seq_len": 128, "gradient_checkpointing": False, "device": "cpu"}
    fits = fit_micro_batch(_per_sequence, batch_size=8, grad_accum=1, limit_gb=9, **kwargs)
    assert not fits.changed and fits.batch_size == 8
    rft = fit_micro_batch(_per_sequence, batch_size=8, grad_accum=1, limit_gb=4.5, **kwargs)
    assert (rft.batch_size, rft.grad_accum, rft.gradient_checkpointing) == (4, 2, False)
    assert "batch_size=4 grad_accum=2" in rft.note and "same global batch" in rft.note
    online = fit_micro_batch(_per_sequence, batch_size=8, grad_accum=1, limit_gb=4.5, accumulate=False, **kwargs)
    assert (online.batch_size, online.grad_accum) == (4, 1) and "the same updates" in online.note
    tight = fit_micro_batch(_per_sequence, batch_size=8, grad_accum=1, limit_gb=0.6, **kwargs)
    assert (tight.batch_size, tight.gradient_checkpointing) == (1, True)
    with pytest.raises(HoneError) as info:
        fit_micro_batch(_per_sequence, batch_size=8, grad_accum=1, limit_gb=0.25, **kwargs)
    assert info.value.where == "memory pre-flight" and "HONE_SKIP_MEMORY_CHECK" in info.value.fix


def test_an_online_run_that_does_not_fit_trains_with_smaller_micro_batches(tiny_model_dir, tmp_path, monkeypatch):
    from honellm.reward.recipes import policy_gradient
    from honellm.reward.recipes.grpo import GRPOConfig, grpo
    from honellm.runs import read_metrics
    from honellm.task import Task
    from honellm.testing import make_tiny_reward_task

    real = policy_gradient.estimate_training_memory

    def one_gib_per_sequence(model, *, micro_batch_size, **kw):
        found = real(model, micro_batch_size=micro_batch_size, **kw)
        return MemoryEstimate(0, 0, 0, micro_batch_size * GiB, 0, 0, micro_batch_size, found.seq_len,
                              found.gradient_checkpointing)

    monkeypatch.setattr(policy_gradient, "estimate_training_memory", one_gib_per_sequence)
    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir))
    config = GRPOConfig(max_steps=1, prompts_per_step=2, group_size=4, batch_size=8, guard_prompts=4, r=4,
                        max_new_tokens=6, precision="fp32", eval_every=0, memory_limit_gb=5)
    artifact = grpo(task, config, out=tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    fit = next(r for r in rows if r.get("event") == "memory_fit")
    assert (fit["batch_size"], fit["grad_accum"]) == (4, 1)
    assert next(r for r in rows if r.get("event") == "start")["estimated_peak_memory_bytes"] == 4 * GiB
    assert artifact.manifest.config["batch_size"] == 4
