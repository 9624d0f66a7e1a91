"""GRPO and RLOO: online policy-gradient RL with group baselines, on a LoRA policy, with reward functions and/or a
reward model -> Artifact.

GRPO (DeepSeekMath, https://arxiv.org/abs/2402.03300): for each prompt sample a group of G completions, score
them, and use the group-normalised reward `(r - mean) / (std + eps)` as every token's advantage; maximise the
clipped surrogate `min(rho A, clip(rho, 1 - eps, 1 + eps) A)` per token, minus `kl_coef` times the k3 estimate of
KL(policy || reference) per token.

RLOO (Ahmadian et al., https://arxiv.org/abs/2402.14740): the baseline of each completion is the mean reward of
the *other* G - 1 completions of its prompt; the KL to the reference is a penalty in the reward (the sequence's
summed log-ratio, k1), and the probability ratio is taken per sequence, as TRL's `RLOOTrainer` does.

Read `train_policy_gradient` top to bottom: set up; then per step: generate (the Generator, batched, KV cache,
vLLM on a GPU), score, reference log-probs (the same model with its adapter disabled: no second copy), advantages,
`ppo_epochs x mini_batches` optimizer updates through the shared `TrainStep`, log, the held-out check and the
reward-hacking guard, checkpoint; save the artifact.

Where this departs from the papers and TRL:
- The reference is the base model (the adapter disabled), never refreshed; the policy is a LoRA adapter.
- `loss` picks a member of the GRPO family (`honellm.reward.losses.POLICY_LOSSES`): `dapo` (default, TRL's default
  `loss_type`) divides by the completion tokens of each update and brings DAPO's clip-higher, dynamic sampling
  (uninformative groups left out, not resampled) and overlong shaping; `grpo` is the paper's per-sequence mean;
  `dr_grpo`, `bnpo`, `gspo`, `cispo` as their papers.
- With one update per step (`ppo_epochs=1, mini_batches=1`) the "old" log-probs are the current ones detached
  (ratio exactly 1, as TRL does), which saves a forward; with several updates they come from a no-grad forward
  before the first update, not from the sampler's own log-probs (bf16 generation kernels differ slightly).
- TRL's default `beta` is 0 (no reference); ours is 0.04 for GRPO (the paper's) and 0.05 for RLOO (TRL's), so the
  KL the guard watches stays bounded.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from honellm.artifact import Artifact
from honellm.core.support import note_paths
from honellm.errors import HoneError
from honellm.methods.registry import Method, register_method
from honellm.program import PromptProgram
from honellm.reward.guard import RewardHackingGuard
from honellm.reward.losses import (
    PolicyLossSettings,
    get_policy_loss,
    grpo_advantages,
    kl_k1,
    overlong_penalty,
    policy_gradient_loss,
    policy_loss,
    rloo_advantages,
    sampler_importance_weights,
    zero_variance_groups,
)
from honellm.reward.rollout import (
    OnlineRLConfig,
    OnlineState,
    RolloutBatch,
    completion_logprobs,
    encode_prompts,
    generate_rollouts,
    gold_reward,
    group_stats,
    held_out_check,
    load_policy,
    merge_results,
    nan_mean,
    no_grad_logprobs,
    observe_guard,
    proxy_reward,
    replay_guard,
    rollout_batches,
    sampler_logprobs,
    sampling_params,
    step_seed,
)
from honellm.training.batching import LengthGroupedBatches
from honellm.training.checkpoint import Checkpointer, load_trainable_state, save_trainable
from honellm.training.logprobs import LossOutput
from honellm.training.memory import check_memory, estimate_training_memory, parameter_bytes
from honellm.training.monitor import TrainingMonitor
from honellm.training.optim import build_optimizer, build_schedule, warmup_steps_for
from honellm.training.precision import Precision
from honellm.training.setup import pick_attention, seed_everything, setup_accelerator
from honellm.training.step import NonFiniteLoss, StepResult, TrainStep

# ---------------------------------------------------------------------------------------------------------------
# Settings


class GRPOConfig(OnlineRLConfig):
    """GRPO and its loss family: group-normalised advantages, a clipped surrogate, k3 KL to the reference."""

    loss: Literal["grpo", "dr_grpo", "dapo", "bnpo", "gspo", "cispo"] = Field(
        "dapo", description="the policy loss (honellm.reward.losses.POLICY_LOSSES): grpo (per-sequence mean), "
                            "dr_grpo (constant normaliser, unscaled advantages), dapo (clip-higher, token mean, "
                            "dynamic sampling, overlong shaping; TRL's default), bnpo (token mean), gspo "
                            "(sequence-level ratio), cispo (clipped, detached importance weights)")
    kl_coef: float = Field(0.04, ge=0, description="weight of the k3 KL to the reference in the loss (the paper's "
                                                   "beta; TRL's default is 0)")
    scale_rewards: bool | None = Field(None, description="divide advantages by the group's reward std (None: the "
                                                         "loss's default, False for dr_grpo)")
    clip_eps_high: float | None = Field(None, gt=0, description="upper clip range (None: the loss's default: 0.28 "
                                                                "for dapo, 5.0 (the weight cap) for cispo, else "
                                                                "clip_eps)")
    entropy_coef: float = Field(0.0, ge=0, description="weight of the token-mean entropy bonus subtracted from the "
                                                       "loss (exploration; TRL's entropy_coef)")
    dynamic_sampling: bool | None = Field(None, description="leave out of the update the groups whose rewards are "
                                                            "all equal (zero advantage; None: on for dapo; off "
                                                            "under several processes)")
    overlong_buffer: int | None = Field(None, ge=0, description="DAPO's soft overlong punishment: the last this "
                                                                "many tokens before max_new_tokens cost up to "
                                                                "overlong_penalty reward (None: a quarter of "
                                                                "max_new_tokens for dapo, else 0)")
    overlong_penalty: float = Field(1.0, ge=0, description="reward lost by a completion that reaches "
                                                           "max_new_tokens under overlong_buffer")
    vllm_importance_sampling_correction: bool | None = Field(
        None, description="weigh each token's loss by exp(trainer log-prob - sampler log-prob), capped: corrects "
                          "the mismatch between the sampler's and the trainer's numbers (TRL's setting; None: on "
                          "where rollouts run on vLLM; true: with any backend)")
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = \
        Field("token_truncate", description="per-token or per-sequence ratios, capped (truncate) or dropped "
                                            "(mask) outside the bounds (honellm.reward.losses.sampler_importance_weights)")
    vllm_importance_sampling_cap: float | None = Field(3.0, gt=0, description="upper bound of the importance ratio "
                                                                           "(TRL's vllm_importance_sampling_clip_max)")

    def resolved(self, max_new_tokens: int) -> GRPOConfig:
        """The settings with every None replaced by the loss's default."""
        dapo = self.loss == "dapo"
        return self.model_copy(update={
            "max_new_tokens": max_new_tokens,
            "scale_rewards": get_policy_loss(self.loss).scale_rewards if self.scale_rewards is None
            else self.scale_rewards,
            "dynamic_sampling": dapo if self.dynamic_sampling is None else self.dynamic_sampling,
            "overlong_buffer": (max_new_tokens // 4 if dapo else 0) if self.overlong_buffer is None
            else min(self.overlong_buffer, max_new_tokens),
        })


class RLOOConfig(OnlineRLConfig):
    """RLOO: leave-one-out baselines, the KL as a penalty in the reward, a per-sequence clipped ratio."""

    kl_coef: float = Field(0.05, ge=0, description="weight of the sequence KL (summed k1) subtracted from the reward "
                                                   "(TRL's beta)")
    group_size: int = Field(8, ge=2, description="completions sampled per prompt (at least 2 for a leave-one-out "
                                                 "baseline)")
    normalize_advantages: bool = Field(False, description="whiten the advantages over the whole step (TRL's "
                                                          "normalize_advantages)")


# ---------------------------------------------------------------------------------------------------------------
# The two variants: how advantages are made and what the loss is


@dataclass
class Advantages:
    """Advantages (N,) and the rewards they were made from, after any KL penalty (N,)."""

    values: torch.Tensor
    rewards: torch.Tensor


def grpo_step_advantages(rewards: torch.Tensor, *, config: GRPOConfig, seq_kl: torch.Tensor | None) -> Advantages:
    """GRPO: `grpo_advantages` of the task rewards (the KL is in the loss, not the reward)."""
    return Advantages(grpo_advantages(rewards, config.group_size, scale=config.scale_rewards), rewards)


def rloo_step_advantages(rewards: torch.Tensor, *, config: RLOOConfig, seq_kl: torch.Tensor | None) -> Advantages:
    """RLOO: reward minus `kl_coef` times the sequence KL (k1 summed), then leave-one-out baselines."""
    if config.kl_coef and seq_kl is not None:
        rewards = rewards - config.kl_coef * seq_kl
    advantages = rloo_advantages(rewards, config.group_size)
    if config.normalize_advantages and advantages.numel() > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
    return Advantages(advantages, rewards)


def grpo_loss(model, batch: RolloutBatch, *, config: GRPOConfig) -> LossOutput:
    """The GRPO family's loss (`config.loss`) on one micro-batch, as a SUM over its loss units for the shared
    `TrainStep`, which divides by the update's total units: tokens (dapo, bnpo, cispo), sequences (grpo, gspo) or
    sequences x `max_new_tokens` (dr_grpo's constant). The entropy bonus is the token mean of each micro-batch,
    weighted the same way. `config` is `GRPOConfig.resolved`.

    `batch.data`: `advantages` (B,), `ref_logps` (B, T) when `kl_coef > 0`, `old_logps` (B, T) when the step takes
    several updates (else the current log-probs, detached: ratio 1).
    """
    logps, entropy = completion_logprobs(model, batch, with_entropy=True)
    mask = batch.mask
    old = batch.data.get("old_logps", logps.detach())
    ref = batch.data.get("ref_logps")
    settings = PolicyLossSettings(clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high,
                                  max_length=config.max_new_tokens)
    loss, metrics = policy_loss(config.loss, logps, old, batch.data["advantages"], mask, settings,
                                kl_coef=config.kl_coef, ref_logps=ref, entropy=entropy,
                                entropy_coef=config.entropy_coef, sampler_weights=batch.data.get("sampler_weights"))
    units = batch.num_loss_units
    # Metrics are means over this micro-batch; as sums weighted like the loss they average over the whole update.
    return LossOutput(loss * units, units, {_METRIC_NAMES.get(k, k): float(v) * units for k, v in metrics.items()})


def loss_units(config: GRPOConfig, batch: RolloutBatch, max_new_tokens: int) -> int:
    """What `grpo_loss` averages over in this micro-batch (see there); rows whose completion takes no loss (masked
    as truncated) still count as sequences, as in TRL's means. 0 when no token takes a loss."""
    if batch.num_completion_tokens == 0:
        return 0
    if config.loss in ("grpo", "gspo"):
        return batch.mask.shape[0]
    if config.loss == "dr_grpo":
        return batch.mask.shape[0] * max_new_tokens
    return batch.num_completion_tokens


def rloo_loss(model, batch: RolloutBatch, *, config: RLOOConfig) -> LossOutput:
    """RLOO's loss on one micro-batch: the clipped surrogate on per-sequence ratios `exp(sum logp - sum old)`,
    summed over sequences (the shared step divides by the sequences of the update: TRL's mean).

    Reuses `policy_gradient_loss` on (B, 1) "tokens" that are whole sequences.
    """
    logps = (completion_logprobs(model, batch) * batch.mask).sum(-1, keepdim=True)
    old = batch.data.get("old_logps")
    old = (old * batch.mask).sum(-1, keepdim=True) if old is not None else logps.detach()
    sequences = (batch.mask.sum(-1, keepdim=True) > 0).float()
    loss, metrics = policy_gradient_loss(logps, old, batch.data["advantages"], sequences, clip_eps=config.clip_eps,
                                         normalisation="token", num_tokens=1.0)
    units = batch.num_loss_units
    return LossOutput(loss, units, {_METRIC_NAMES.get(k, k): float(v) * units for k, v in metrics.items()})


_METRIC_NAMES = {"clip_ratio/region_mean": "clip_fraction", "clip_ratio/low_mean": "clip_low",
                 "clip_ratio/high_mean": "clip_high"}


@dataclass(frozen=True)
class PolicyGradientMethod:
    """What distinguishes GRPO from RLOO; everything else is `train_policy_gradient`."""

    name: str
    config: type[OnlineRLConfig]
    advantages: Callable[..., Advantages]
    loss: Callable[..., LossOutput]
    kl_in_reward: bool  # the KL to the reference is a reward penalty (RLOO), not a loss term (GRPO)
    sequence_units: bool  # the loss averages over sequences (RLOO), not tokens
    needs_reference: bool = False  # reference log-probs whatever kl_coef says (online DPO)
    together: int = 1  # completions kept in one micro-batch, in order (online DPO's pairs)
    drop_ties: bool = False  # always leave out groups whose rewards are all equal (online DPO: no preference)


GRPO = PolicyGradientMethod("grpo", GRPOConfig, grpo_step_advantages, grpo_loss, False, False)
RLOO = PolicyGradientMethod("rloo", RLOOConfig, rloo_step_advantages, rloo_loss, True, True)


def grpo(task, config: GRPOConfig | None = None, *, out: str | Path | None = None, resume: bool = False,
         force: bool = False) -> Artifact:
    """Train the task's model with GRPO on its reward; return the Artifact (a LoRA adapter + the prompt program)."""
    return train_policy_gradient(task, GRPO, config or GRPOConfig(), out=out, resume=resume, force=force)


def rloo(task, config: RLOOConfig | None = None, *, out: str | Path | None = None, resume: bool = False,
         force: bool = False) -> Artifact:
    """Train the task's model with RLOO on its reward; return the Artifact."""
    return train_policy_gradient(task, RLOO, config or RLOOConfig(), out=out, resume=resume, force=force)


ONLINE_NEEDS = ("references", "rewards")  # prompts (with whatever the rewards read); a target is optional

register_method(Method("grpo", "reward", GRPOConfig, grpo, "group relative policy optimisation: online RL on the "
                       "task's rewards, group-normalised advantages, k3 KL in the loss",
                       "https://arxiv.org/abs/2402.03300", needs=ONLINE_NEEDS))
register_method(Method("rloo", "reward", RLOOConfig, rloo, "REINFORCE leave-one-out: online RL on the task's "
                       "rewards, KL penalty in the reward", "https://arxiv.org/abs/2402.14740", needs=ONLINE_NEEDS))


# ---------------------------------------------------------------------------------------------------------------
# The recipe


def train_policy_gradient(task, method: PolicyGradientMethod, config: OnlineRLConfig, *,
                          out: str | Path | None = None, resume: bool = False, force: bool = False) -> Artifact:
    """GRPO or RLOO on `task` (see the module docstring); the run folder is laid out as `hone tune`'s."""
    if not isinstance(config, method.config):
        raise TypeError(f"{method.name} takes a {method.config.__name__}, not a {type(config).__name__}")
    from honellm.training.run_folder import open_run

    # --- processes, precision, run folder
    accelerator = setup_accelerator()
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    precision = Precision.resolve(config.precision, device)
    run = open_run(task, method.name, config, out=out, resume=resume, force=force, accelerator=accelerator)

    # --- the policy: the base model with a LoRA adapter (frozen weights in the compute dtype, LoRA in fp32)
    seed_everything(config.seed)
    model, tokenizer = load_policy(task, config, precision, device)
    _, trainable_params, total_params = parameter_bytes(model)

    # --- prompts, rewards, held-out set
    program = PromptProgram.from_task(task)
    max_new_tokens = config.max_new_tokens or task.config.generation.max_new_tokens
    if isinstance(config, GRPOConfig):
        config = config.resolved(max_new_tokens)  # the loss's defaults (dapo: clip-higher, dynamic sampling, ...)
    max_prompt = max(8, config.max_length - max_new_tokens)
    train = encode_prompts(task, program, tokenizer, "train", max_prompt_tokens=max_prompt)
    tools = None
    if task.config.tools:  # every completion is a tool episode of up to tool_turns turns; prompts show the tools
        from honellm.generation.tools import ToolEnvironment, load_tools

        tools = ToolEnvironment(load_tools(task.config.tools, task.base_dir, where=f"{task.source} (tools)"),
                                tokenizer, max_turns=task.config.tool_turns)
        train.texts = [tools.render(m) for m in train.messages]
        train.ids = [tools.prompt_ids(m) for m in train.messages]
    check_every = config.check_every if task.has_split("validation") else 0
    held_out = (encode_prompts(task, program, tokenizer, "validation", limit=config.guard_prompts,
                               max_prompt_tokens=max_prompt) if check_every else None)
    proxy = proxy_reward(task, config)
    gold = gold_reward(task, config.gold_reward_model) if held_out is not None else None
    if len(train) < world * config.prompts_per_step:
        raise HoneError(f"{len(train)} training prompts cannot fill a step of {config.prompts_per_step} prompts on "
                        f"{world} process(es)", where=task.source, fix="lower prompts_per_step, or add prompts")
    sampler = LengthGroupedBatches([len(ids) for ids in train.ids], config.prompts_per_step * world,
                                   seed=config.seed, slots=world)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * sampler.steps_per_epoch))
    total_updates = total_steps * config.updates_per_step

    # --- attention kernel of the policy's training forward (as SFT picks it) and memory pre-flight: the longest
    # micro-batch of prompt + completion
    longest = max(map(len, train.ids)) + max_new_tokens * (task.config.tool_turns * 2 if tools else 1)
    attention = pick_attention(model, config.attention, device=device, longest=longest)

    def estimate_for(batch: int, length: int, checkpointing: bool):
        return estimate_training_memory(model, micro_batch_size=batch, seq_len=min(length, longest),
                                        gradient_checkpointing=checkpointing, loss_tokens=batch * max_new_tokens,
                                        compute_dtype=precision.compute_dtype, distributed=world > 1,
                                        device_type=device.type, attention=attention)

    memory = check_memory(estimate_for, batch_size=config.batch_size, seq_len=longest, grad_accum=1,
                          gradient_checkpointing=config.gradient_checkpointing, device=device,
                          limit_gb=config.memory_limit_gb)

    # --- optimizer, schedule, accelerator, generator, resume
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
    warmup = warmup_steps_for(total_updates, warmup_ratio=config.warmup_ratio, warmup_steps=config.warmup_steps)
    schedule = build_schedule(optimizer, total_steps=total_updates, warmup_steps=warmup, schedule=config.schedule,
                              min_ratio=config.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = accelerator.unwrap_model(model)  # generation, no-grad forwards and the reference run on it
    from honellm.generation import Generator

    generator = Generator(policy, tokenizer, backend=config.generation_backend,
                          batch_size=config.generation_batch_size)
    # Importance-sampling correction of the sampler's numbers (GRPO family, plain rollouts): vLLM's by default.
    correct = getattr(config, "vllm_importance_sampling_correction", False)
    correct = tools is None and (generator.backend == "vllm" if correct is None else bool(correct))
    checkpoints = Checkpointer(run.path / "checkpoints", keep=config.keep_checkpoints, accelerator=accelerator)
    best_file = run.path / "checkpoints" / "best.safetensors"
    guard = RewardHackingGuard(config.guard)
    state = OnlineState()
    latest = checkpoints.latest() if resume else None
    if latest is not None:
        state = OnlineState.from_dict(checkpoints.restore(latest, model=model, optimizer=optimizer, schedule=schedule))
        replay_guard(guard, state.guard_history)
    monitor = TrainingMonitor(run, total_steps=total_steps, start_step=state.step, is_main=is_main, device=device,
                              desc=f"{method.name} {task.name}")
    monitor.load_state_dict(state.monitor)
    if is_main:
        run.log_metrics(event="start" if latest is None else "resume", step=state.step, total_steps=total_steps,
                        updates_per_step=config.updates_per_step, processes=world, precision=precision.name,
                        trainable_params=trainable_params, total_params=total_params,
                        generation_backend=generator.backend, proxy_reward=proxy.names,
                        gold=gold.names if gold is not None else None, estimated_peak_memory_bytes=memory.total)
        note_paths(model, run, monitor.note)  # which paths the model takes, once (honellm.core.support)
    train_step = TrainStep(accelerator, model, optimizer, schedule, precision=precision,
                           max_grad_norm=config.max_grad_norm)
    pad_id = generator.pad_id

    def check(step: int) -> list:
        """The held-out check: measure, let the guard judge, keep the weights of the best gold signal."""
        params = sampling_params(config, task, seed=step_seed(config.seed, 0, salt=7),
                                 temperature=config.guard_temperature)
        stats = held_out_check(policy, generator, task, held_out, params, proxy=proxy, gold=gold,
                               precision=precision, device=device, batch_size=config.batch_size, pad_id=pad_id,
                               accelerator=accelerator)
        alarms = observe_guard(guard, step, stats, monitor)
        state.guard_history = [dict(o) for o in guard.summary()["history"]]
        if guard.best_step == step:
            state.best_step = step
            if is_main:
                save_trainable(best_file, policy)
        return alarms

    # --- the loop
    alarm_note = None
    if held_out is not None and state.step == 0 and not guard.history:
        check(0)  # the starting policy: the guard's baseline and the best checkpoint until beaten
    while state.step < total_steps:
        # 1. generate: group_size completions for each of this process's prompts
        indices = sampler.micro_batches(state.step, rank=rank, world_size=world)[0]
        prompts = train.subset(indices)
        params = sampling_params(config, task, seed=step_seed(config.seed, state.step, rank))
        if correct:  # the sampler's per-token log-probs, for the correction
            params = dataclasses.replace(params, logprobs=True)
        rollouts = generate_rollouts(generator, prompts, params, config.group_size, precision=precision,
                                     tools=tools)

        # 2. score
        started = time.perf_counter()
        scores = proxy.score_rollouts(task, rollouts)
        task_rewards = rewards = scores.total_tensor()
        shaping = getattr(config, "overlong_buffer", 0) if tools is None else 0  # episodes: turns have their limit
        if shaping:  # DAPO's soft overlong punishment, on top of the task's rewards
            rewards = rewards + overlong_penalty(torch.tensor(rollouts.lengths), max_new_tokens, shaping,
                                                 config.overlong_penalty)
        score_seconds = time.perf_counter() - started

        # 3. batches, reference and old log-probs, advantages
        started = time.perf_counter()
        keep = [not t for t in rollouts.truncated] if config.mask_truncated else None
        prompt_ids = rollouts.per_completion(prompts.ids)
        # DAPO's dynamic sampling: groups whose rewards are all equal have zero advantage; leave them out entirely.
        # Under several processes every one must take the same updates (DDP reduces in each): dynamic sampling is
        # off there, and online DPO's tied pairs keep their rows with no loss token (a constant, gradient-free term).
        drop = method.drop_ties or (getattr(config, "dynamic_sampling", False) and world == 1)
        dropped = zero_variance_groups(rewards, config.group_size) if drop \
            else torch.zeros(len(rollouts), dtype=torch.bool)
        if world > 1 and bool(dropped.any()):
            keep = [(keep is None or keep[i]) and not bool(dropped[i]) for i in range(len(rollouts))]
            dropped = torch.zeros(len(rollouts), dtype=torch.bool)
        rows = [i for i in range(len(rollouts)) if not dropped[i]]
        batches = rollout_batches([prompt_ids[i] for i in rows], [rollouts.token_ids[i] for i in rows],
                                  batch_size=config.batch_size, pad_id=pad_id,
                                  loss_mask=[keep[i] for i in rows] if keep is not None else None,
                                  together=method.together,
                                  token_masks=[rollouts.token_masks[i] for i in rows] if tools else None)
        for b in batches:
            b.rows = [rows[r] for r in b.rows]  # back to indices of the whole rollout
        kl_coef = getattr(config, "kl_coef", 0.0)
        need_ref = method.needs_reference or kl_coef > 0
        ref = no_grad_logprobs(policy, batches, precision=precision, device=device, reference=True) if need_ref \
            else None
        need_old = config.updates_per_step > 1 or (method.kl_in_reward and kl_coef > 0) or correct
        old = no_grad_logprobs(policy, batches, precision=precision, device=device) if need_old else None
        seq_kl = None
        if ref is not None and old is not None:
            seq_kl = torch.zeros(len(rollouts))
            for b, o, r in zip(batches, old, ref, strict=True):
                seq_kl[b.rows] = (kl_k1(o, r) * b.mask.to(o.device)).sum(-1).cpu()
        advantages = method.advantages(rewards, config=config, seq_kl=seq_kl)
        for k, b in enumerate(batches):
            b.data["advantages"] = advantages.values[b.rows]
            if ref is not None and not method.kl_in_reward:
                b.data["ref_logps"] = ref[k]
            if old is not None and config.updates_per_step > 1:
                b.data["old_logps"] = old[k]
            if correct:
                sampler = sampler_logprobs([rollouts.completions[r] for r in b.rows], b.mask).to(old[k].device)
                b.data["sampler_weights"] = sampler_importance_weights(
                    old[k], sampler, b.mask.to(old[k].device), mode=config.vllm_importance_sampling_mode,
                    clip_max=config.vllm_importance_sampling_cap)
            if isinstance(config, GRPOConfig):
                b.num_loss_units = loss_units(config, b, max_new_tokens)
            elif method.together > 1:  # online DPO: pairs
                b.num_loss_units = len(b.rows) // method.together
            else:
                b.num_loss_units = int(b.mask.sum(-1).gt(0).sum())
        prepare_seconds = time.perf_counter() - started

        # 4. update: ppo_epochs passes, each split into mini_batches optimizer updates
        results: list[StepResult] = []
        order_rng = np.random.default_rng([config.seed, state.step])
        for _ in range(config.ppo_epochs):
            order = order_rng.permutation(len(batches)) if config.ppo_epochs > 1 else np.arange(len(batches))
            for part in np.array_split(order, config.mini_batches):
                update = [batches[i] for i in part if batches[i].num_loss_units > 0]
                if not update:  # every completion of this update is masked (truncated, under mask_truncated)
                    continue
                try:
                    results.append(train_step(update, lambda m, b: method.loss(m, b, config=config),
                                              step=state.step))
                except NonFiniteLoss as err:
                    monitor.close()
                    raise HoneError(err.what, where=str(run.path), fix=err.fix) from None
        state.step += 1
        if monitor.out_of_time(config.max_seconds, state.step, accelerator):
            total_steps = state.step  # the budget is spent: this step is the last (evaluate and save as at the end)

        # 5. log
        step_result = merge_results(results, seconds=prepare_seconds)
        state.generation_seconds += rollouts.seconds
        state.generated_tokens += rollouts.generated_tokens
        state.score_seconds += score_seconds
        train_seconds = step_result.seconds
        step_seconds = rollouts.seconds + score_seconds + train_seconds
        stats = group_stats(task_rewards, config.group_size)
        values = {
            "kind": "train", **stats,
            **{f"rewards/{k}": nan_mean(v) for k, v in scores.per_function.items()},
            "completion_length": float(np.mean(rollouts.lengths)),
            "truncated": float(np.mean(rollouts.truncated)),
            "generation_seconds": round(rollouts.seconds, 3),
            "scoring_seconds": round(score_seconds, 3),
            "training_seconds": round(train_seconds, 3),
            "reference_seconds": round(prepare_seconds, 3),  # reference (and old) log-probs, before the updates
            "generation_share": round(rollouts.seconds / step_seconds, 4) if step_seconds > 0 else None,
            "generation_tokens_per_second": round(rollouts.generated_tokens / max(rollouts.seconds, 1e-9), 1),
            "training_tokens_per_second": round(step_result.tokens / max(train_seconds, 1e-9), 1),
            "updates": len(results),
            "dropped_groups": float(dropped.float().mean()),
        }
        if tools:
            values["tool_calls"] = float(np.mean(rollouts.tool_calls))
        if shaping:
            values["rewards/overlong"] = nan_mean((rewards - task_rewards).tolist())
        if seq_kl is not None:
            values["kl_sequence"] = float(seq_kl.mean())
        postfix = {"reward": f"{stats['reward']:.3f}"} | ({"alarm": alarm_note} if alarm_note else {})
        log = state.step % config.log_every == 0 or state.step == total_steps
        monitor.log_step(state.step, step_result, log=log, postfix=postfix, **values)

        # 6. the held-out check and the guard
        stop = False
        if check_every and (state.step % check_every == 0 or state.step == total_steps):
            alarms = check(state.step)
            if alarms:
                alarm_note = ",".join(a.kind for a in alarms)
                monitor.bar.set_postfix({"loss": f"{step_result.loss:.4f}"} | postfix | {"alarm": alarm_note})
            stop = guard.should_stop
            if stop:
                monitor.log(state.step, event="guard_stop", best_step=guard.best_step,
                            alarms=[a.kind for a in guard.alarms])
                monitor.note(f"the guard stopped the run at step {state.step}; keeping step {guard.best_step}")

        # 7. checkpoint
        save_every = config.save_every if config.save_every is not None else check_every
        if save_every and state.step < total_steps and not stop and state.step % save_every == 0:
            state.monitor = monitor.state_dict()
            checkpoints.save(state.step, model=model, optimizer=optimizer, schedule=schedule, state=state.to_dict())
        if stop:
            break
    monitor.close()
    accelerator.wait_for_everyone()

    # --- keep the best weights (by the gold signal) when asked or when the guard stopped the run; save
    keep_best = (config.select_best or guard.should_stop) and state.best_step is not None
    selected = state.best_step if keep_best else state.step
    if keep_best and state.best_step != state.step and best_file.exists():
        from safetensors.torch import load_file

        load_trainable_state(policy, load_file(best_file), where=str(best_file))
    guard_summary = guard.summary() if guard.history else None
    if is_main and guard_summary is not None:
        run.log_metrics(step=state.step, kind="guard_summary", best_step=guard_summary["best_step"],
                        selected_step=selected, alarms=[a["kind"] for a in guard_summary["alarms"]])
    metrics = {"final_step": state.step, "selected_step": selected, "best_step": state.best_step,
               "stopped_by_guard": guard.should_stop}
    if guard.history:
        chosen = next((o for o in guard.history if o.step == selected), guard.history[-1])
        metrics |= {"val_proxy_reward": chosen.proxy_reward, "val_gold": chosen.gold, "val_kl": chosen.kl}
        metrics["guard"] = guard_summary
    summary = monitor.summary()
    rollout_cost = {"generation_seconds": round(state.generation_seconds, 2),
                    "generated_tokens": state.generated_tokens, "scoring_seconds": round(state.score_seconds, 2)}
    busy = state.generation_seconds + state.score_seconds + summary["train_seconds"]
    rollout_cost["generation_share"] = round(state.generation_seconds / busy, 4) if busy > 0 else None
    cost = {"trainable_params": trainable_params, "total_params": total_params, "processes": world,
            "precision": precision.name, "device": device.type, **summary, **rollout_cost}
    artifact = Artifact.create(name=f"{task.name}-{method.name}", method=method.name, kind="adapter",
                               base_model=task.config.model, program=program, task=task,
                               config={"method": method.name, **config.model_dump(mode="json")},
                               metrics=metrics, cost=cost, run_dir=str(run.path))
    if is_main:
        artifact.save(run.path / "artifact", force=True, model=policy)
        run.log_metrics(event="done", **{k: v for k, v in metrics.items() if k != "guard"}, **summary,
                        **rollout_cost)
        run.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return artifact
