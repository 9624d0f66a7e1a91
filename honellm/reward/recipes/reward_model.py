"""The reward-model recipe: a scalar head on the task's base model (LoRA or full), trained on preference pairs with
the Bradley-Terry loss -> Artifact of kind "reward_model" (see `honellm.reward.reward_model`).

Read top to bottom: set up the processes and the run folder; load the model, apply the adapter, add the head;
tokenize the pairs; check memory; loop (one optimizer step, log, evaluate pairwise accuracy on validation,
checkpoint); keep the best weights; measure the score statistics; save.

A micro-batch of B pairs is ONE batch of 2B sequences (chosen rows, then rejected rows): one forward, one
backward. The LM head never runs: the backbone's final hidden state at each sequence's last token (the
end-of-turn token after the answer) goes through the scalar head.

Loss: `-log sigmoid(r_chosen - r_rejected)` (InstructGPT, https://arxiv.org/abs/2203.02155, Eq. 1), plus
`center_coefficient * mean((r_c + r_r)^2)` when set (Eisenstein et al. 2023, https://arxiv.org/abs/2312.09244;
TRL's `center_rewards_coefficient`). Departures from TRL's `RewardTrainer`: the head has no bias and is
initialised with std 1/sqrt(hidden + 1) (Stiennon et al. 2020) where TRL uses the model config's
`initializer_range`; truncation keeps the answer and drops the start of the prompt first.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from honellm.methods.registry import Method, register_method
from honellm.program import PromptProgram
from honellm.reward.losses import bradley_terry_loss, preference_metrics
from honellm.reward.recipes.common import (
    AlignConfig,
    PairBatch,
    collate_pairs,
    encode_pairs,
    finish_artifact,
    flat_pairs,
    load_trainable,
)
from honellm.reward.reward_model import RewardModel
from honellm.training.logprobs import LossOutput, metric_sums
from honellm.training.loop import Best, plan_steps, start_training
from honellm.training.memory import fit_memory, parameter_bytes
from honellm.training.precision import Precision
from honellm.training.run_folder import open_run
from honellm.training.setup import pick_attention, seed_everything, setup_accelerator


class RewardModelConfig(AlignConfig):
    """A Bradley-Terry reward model: the shared settings, the reward model's learning rate, centring."""

    lr: float = Field(1e-4, gt=0, description="peak learning rate of AdamW (TRL's RewardTrainer default; ~1e-5 "
                                              "with adapter=full)")
    center_coefficient: float | None = Field(
        None, ge=0, description="add this times mean((r_chosen + r_rejected)^2) to keep scores centred on 0 "
                                "(None: off; 0.01 is the paper's value)")


def reward_model_loss(module, batch: PairBatch, *, center_coefficient: float | None = None) -> LossOutput:
    """Bradley-Terry loss of one micro-batch (chosen and rejected scored in ONE forward); sums over pairs."""
    sequences = batch.sequences
    scores = module(sequences.input_ids, sequences.attention_mask)
    n = batch.n_pairs
    chosen, rejected = scores[:n], scores[n:]
    value, _ = bradley_terry_loss(chosen, rejected, center_coefficient=center_coefficient)
    metrics = preference_metrics(chosen, rejected)  # rewards/chosen, rewards/rejected, rewards/accuracies, margins
    return LossOutput(value * n, n, metric_sums(metrics, n))


def train_reward_model(task, config: RewardModelConfig, *, out=None, resume: bool = False, force: bool = False):
    """Train a reward model on the task's preference pairs -> Artifact (kind "reward_model")."""
    method = "reward_model"

    # --- processes, precision, run folder
    accelerator = setup_accelerator()
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    precision = Precision.resolve(config.precision, device)
    run = open_run(task, method, config, out=out, resume=resume, force=force, accelerator=accelerator)

    # --- model: the base with the adapter, plus a scalar head (fp32, trainable)
    seed_everything(config.seed)
    model, tokenizer = load_trainable(task, config, device, precision)
    program = PromptProgram.from_task(task)
    reward_model = RewardModel(model, tokenizer, program=program, max_length=config.max_length, precision=precision)
    reward_model.head.to(device)
    precision.cast_model(reward_model)
    _, trainable_params, total_params = parameter_bytes(reward_model)
    pad_id = tokenizer.pad_token_id

    # --- data
    train = encode_pairs(task, program, tokenizer, "train", max_length=config.max_length, limit=config.train_limit)
    validation = (encode_pairs(task, program, tokenizer, "validation", max_length=config.max_length,
                               limit=config.eval_limit) if task.has_split("validation") else None)
    steps = plan_steps([p.length for p in train], config, world=world, validating=validation is not None,
                       where=task.source, what="training pairs")
    sampler, per_epoch, total_steps = steps.sampler, steps.per_epoch, steps.total_steps
    truncated = sum(p.truncated for p in train)
    if truncated and is_main:
        run.log_metrics(event="truncated", pairs=truncated, max_length=config.max_length)

    # --- attention kernel (as SFT picks it) and memory pre-flight: 2 x batch_size sequences, no LM head
    longest = max(p.length for p in train)
    attention = pick_attention(model, config.attention, device=device, longest=longest)
    plan = fit_memory(reward_model, sampler, loss_tokens=[0] * len(train), sequences_per_example=2,
                      batch_size=min(config.batch_size, len(train)), grad_accum=config.grad_accum,
                      gradient_checkpointing=config.gradient_checkpointing, device=device, world=world,
                      limit_gb=config.memory_limit_gb, trains_all_weights=config.adapter == "full",
                      compute_dtype=precision.compute_dtype, attention=attention)
    config, memory = plan.apply(config, model, run if is_main else None), plan.estimate

    # --- optimizer, schedule, accelerator, resume
    training = start_training(accelerator, reward_model, config, run, total_steps=total_steps, resume=resume,
                              precision=precision, desc=f"{method} {task.name}")
    module, state, monitor = training.model, training.state, training.monitor
    if is_main:
        run.log_metrics(event="resume" if training.resumed_from else "start", step=state.step, total_steps=total_steps,
                        steps_per_epoch=per_epoch, processes=world, precision=precision.name, pairs=len(train),
                        trainable_params=trainable_params, total_params=total_params,
                        estimated_peak_memory_bytes=memory.total)

    def loss_fn(module, batch: PairBatch) -> LossOutput:
        return reward_model_loss(module, batch, center_coefficient=config.center_coefficient)

    def evaluate() -> dict:
        """Pairwise accuracy, mean margin and loss of the reward model on the validation pairs."""
        chosen, rejected = score_pairs_sharded(reward_model, validation, batch_size=config.eval_batch_size,
                                               accelerator=accelerator)
        value, metrics = bradley_terry_loss(chosen, rejected)
        return {"val_loss": float(value), "val_accuracy": float(metrics["accuracy"]),
                "val_margin": float(metrics["margin"]), "val_mean_reward": float(metrics["mean_reward"])}

    tail = training.tail(per_epoch=per_epoch, evaluate=lambda step: evaluate(), eval_every=steps.eval_every,
                         best=Best("val_accuracy"), select_best=config.select_best,
                         save_every=steps.save_every)

    # --- the loop
    while tail.running():
        micro_batches = [collate_pairs([train[i] for i in index], index, pad_id)
                         for index in sampler.micro_batches(state.step, rank=rank, world_size=world,
                                                            grad_accum=config.grad_accum)]
        tail.end_step(tail.step(training.step, micro_batches, loss_fn))
    selected = tail.finish(keep_best=config.select_best)

    # --- keep the best weights, measure the score statistics, save
    def save(artifact, path) -> None:
        """Adapter (or full weights) + the head + reward_model.json, with the scores' mean and std measured on
        the validation answers (the training pairs when there is no validation split)."""
        measured = validation if validation is not None else train[: config.eval_limit]
        scores = np.asarray(reward_model.score_sequences(flat_pairs(measured), batch_size=config.eval_batch_size))
        reward_model.stats = {"score_mean": float(scores.mean()), "score_std": float(scores.std()),
                              "stats_split": "validation" if validation is not None else "train"}
        artifact.manifest.metrics.update({k: v for k, v in reward_model.stats.items() if k != "stats_split"})
        full = config.adapter == "full"
        artifact.save(path, force=True, model=reward_model.model, tokenizer=tokenizer if full else None,
                      extra_files=reward_model.head_files())

    return finish_artifact(task=task, method=method, kind="reward_model", config=config, program=program, run=run,
                           accelerator=accelerator, model=module, state=state, selected=selected, monitor=monitor,
                           precision=precision, trainable_params=trainable_params, total_params=total_params,
                           extra_metrics=Best("val_accuracy").kept(state), save=save)


def score_pairs_sharded(reward_model: RewardModel, pairs, *, batch_size: int, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and rejected answers of `pairs` ([N] each), each process scoring a shard."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    sequences = flat_pairs(pairs)
    mine = list(range(rank, len(sequences), world))
    scores = reward_model.score_sequences([sequences[i] for i in mine], batch_size=batch_size,
                                          desc="validation" if accelerator.is_main_process else "")
    found = list(zip(mine, scores, strict=True))
    if world > 1:
        found = gather_object(found)
    values = torch.zeros(len(sequences))
    for i, value in found:
        values[i] = value
    return values[0::2], values[1::2]


register_method(Method("reward_model", "reward", RewardModelConfig, train_reward_model,
                       "Bradley-Terry reward model: a scalar head on the base (LoRA or full)",
                       "https://arxiv.org/abs/2203.02155", needs=("pairs",)))
