"""PPO, classic RLHF: a reward model's score (or the task's reward functions) at the end of each completion, a
per-token KL penalty to the reference in the reward, a value head, GAE, and the clipped objective -> Artifact.

Papers: PPO, https://arxiv.org/abs/1707.06347; RLHF with a KL-penalised reward, Ziegler et al.
https://arxiv.org/abs/1909.08593 and InstructGPT https://arxiv.org/abs/2203.02155; GAE,
https://arxiv.org/abs/1506.02438. The pure pieces (`kl_penalised_rewards`, `gae`, `masked_whiten`,
`ppo_policy_loss`, `ppo_value_loss`) live in `honellm.reward.losses`, checked against TRL's PPO trainer.

Read `ppo` top to bottom: set up; then per step: generate (one completion per prompt by default), score, a no-grad
forward for the old log-probs and values, the reference log-probs (adapter disabled), per-token rewards, GAE and
whitened advantages, `ppo_epochs x mini_batches` updates of the policy and value losses; log; held-out check and
guard; checkpoint; save.

Where this departs from TRL's PPO trainer (trl/experimental/ppo):
- Policy and value share one base model and one LoRA adapter: the value head is a linear layer on the policy's last
  hidden state (one forward gives both), instead of a separate value model initialised from the reward model. The
  reference is the same model with the adapter disabled. The value head starts at zero (V = 0 everywhere).
- The score goes on the last completion token, not one position past it (see `kl_penalised_rewards`).
- The reward is a reward model and/or the task's reward functions (TRL: a reward model).
- No `missing_eos_penalty` or reward whitening; `mask_truncated` drops truncated completions from the loss.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from honellm.artifact import Artifact
from honellm.core import fastpath
from honellm.core.support import note_paths
from honellm.errors import HoneError
from honellm.methods.registry import Method, register_method
from honellm.program import PromptProgram
from honellm.reward.guard import RewardHackingGuard
from honellm.reward.losses import gae, kl_k1, kl_k3, kl_penalised_rewards, ppo_policy_loss, ppo_value_loss
from honellm.reward.rollout import (
    OnlineRLConfig,
    OnlineState,
    RolloutBatch,
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
    sampling_params,
    scatter_tokens,
    step_seed,
)
from honellm.training.batching import LengthGroupedBatches
from honellm.training.checkpoint import Checkpointer, load_trainable_state, save_trainable
from honellm.training.logprobs import LossOutput, predicting_positions
from honellm.training.memory import check_memory, estimate_training_memory, parameter_bytes
from honellm.training.monitor import TrainingMonitor
from honellm.training.optim import build_optimizer, build_schedule, warmup_steps_for
from honellm.training.precision import Precision
from honellm.training.setup import pick_attention, seed_everything, setup_accelerator
from honellm.training.step import NonFiniteLoss, StepResult, TrainStep

VALUE_HEAD_FILE = "value_head.safetensors"


class PPOConfig(OnlineRLConfig):
    """PPO with a KL-penalised reward, GAE and a value head sharing the policy's LoRA base."""

    prompts_per_step: int = Field(16, ge=1, description="training prompts per step (on each process)")
    group_size: int = Field(1, ge=1, description="completions sampled per prompt (PPO needs one)")
    kl_coef: float = Field(0.05, ge=0, description="weight of the per-token KL penalty in the reward (TRL's kl_coef)")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="per-token KL estimate in the reward (k1: TRL's "
                                                               "default)")
    gamma: float = Field(1.0, ge=0, le=1, description="discount factor of GAE")
    lam: float = Field(0.95, ge=0, le=1, description="lambda of GAE")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    value_clip_eps: float = Field(0.2, gt=0, description="clip range of the value update (TRL's cliprange_value)")
    ppo_epochs: int = Field(4, ge=1, description="passes over each step's completions (TRL's num_ppo_epochs)")


class PolicyWithValueHead(nn.Module):
    """A LoRA policy and a scalar value head on its last hidden state: one forward gives log-probs and values.

    `forward(batch)` returns, for the positions that predict a completion token (row-major, as
    `token_logprobs`), their log-probs and the values V(s_t) of the state before that token, each flat (n,).
    One module, so that DDP sees the value head's parameters and `accelerator.prepare` wraps both.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        hidden = policy.get_base_model().config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, labels):
        base = self.policy.get_base_model()
        keep = predicting_positions(labels)
        rows, positions = keep.nonzero(as_tuple=True)
        index = rows * labels.shape[1] + positions  # row-major, as hidden[keep]
        # The direct LLaMA forward at those positions only, or None
        states = fastpath.hidden_states(self.policy, input_ids, attention_mask, index)  # (n, hidden)
        if states is None:
            hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            states = hidden[keep]
        targets = labels[rows, positions + 1]
        logits = base.get_output_embeddings()(states).float()
        logps = -F.cross_entropy(logits, targets, reduction="none")
        values = self.value_head(states.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logps, values


def policy_and_values(model, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, values) of the completion tokens, each (B, T), zero on padding."""
    if batch.num_completion_tokens == 0:
        zeros = torch.zeros(batch.mask.shape, device=batch.mask.device)
        return zeros, zeros.clone()
    b = batch.batch
    logps, values = model(b.input_ids, b.attention_mask, b.labels)
    return scatter_tokens(logps, batch.mask), scatter_tokens(values, batch.mask)


def ppo_loss(model, batch: RolloutBatch, *, config: PPOConfig) -> LossOutput:
    """The clipped policy loss plus `vf_coef` times the clipped value loss, token means of this micro-batch,
    returned as sums over its completion tokens for the shared `TrainStep`.

    `batch.data`: `old_logps`, `old_values`, `advantages`, `returns`, all (B, T).
    """
    logps, values = policy_and_values(model, batch)
    d, mask = batch.data, batch.mask
    policy_loss, policy_metrics = ppo_policy_loss(logps, d["old_logps"], d["advantages"], mask,
                                                  clip_eps=config.clip_eps)
    value_loss, value_metrics = ppo_value_loss(values, d["old_values"], d["returns"], mask,
                                               clip_eps=config.value_clip_eps)
    tokens = float(mask.sum())
    metrics = {"policy_loss": float(policy_loss.detach()) * tokens, "value_loss": float(value_loss.detach()) * tokens,
               "clip_fraction": float(policy_metrics["clipfrac"]) * tokens,
               "approx_kl": float(policy_metrics["approxkl"]) * tokens,
               "value_clip_fraction": float(value_metrics["vf_clipfrac"]) * tokens}
    return LossOutput((policy_loss + config.vf_coef * value_loss) * tokens, int(tokens), metrics)


def ppo(task, config: PPOConfig | None = None, *, out: str | Path | None = None, resume: bool = False,
        force: bool = False) -> Artifact:
    """Train the task's model with PPO on its reward; return the Artifact (the policy's LoRA adapter; the value
    head is kept beside it in `value_head.safetensors`)."""
    config = config or PPOConfig()
    from honellm.training.run_folder import open_run

    # --- processes, precision, run folder
    accelerator = setup_accelerator()
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    precision = Precision.resolve(config.precision, device)
    run = open_run(task, "ppo", config, out=out, resume=resume, force=force, accelerator=accelerator)

    # --- policy + value head, sharing the base through one LoRA adapter
    seed_everything(config.seed)
    policy, tokenizer = load_policy(task, config, precision, device)
    model = PolicyWithValueHead(policy).to(device)
    _, trainable_params, total_params = parameter_bytes(model)

    # --- prompts, rewards, held-out set
    program = PromptProgram.from_task(task)
    max_new_tokens = config.max_new_tokens or task.config.generation.max_new_tokens
    max_prompt = max(8, config.max_length - max_new_tokens)
    train = encode_prompts(task, program, tokenizer, "train", max_prompt_tokens=max_prompt)
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

    # --- attention kernel of the training forward (as SFT picks it) and memory pre-flight
    longest = max(map(len, train.ids)) + max_new_tokens
    attention = pick_attention(policy, config.attention, device=device, longest=longest)

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
    unwrapped = accelerator.unwrap_model(model)
    from honellm.generation import Generator

    generator = Generator(policy, tokenizer, backend=config.generation_backend,
                          batch_size=config.generation_batch_size)
    checkpoints = Checkpointer(run.path / "checkpoints", keep=config.keep_checkpoints, accelerator=accelerator)
    best_file = run.path / "checkpoints" / "best.safetensors"
    guard = RewardHackingGuard(config.guard)
    state = OnlineState()
    latest = checkpoints.latest() if resume else None
    if latest is not None:
        state = OnlineState.from_dict(checkpoints.restore(latest, model=model, optimizer=optimizer, schedule=schedule))
        replay_guard(guard, state.guard_history)
    monitor = TrainingMonitor(run, total_steps=total_steps, start_step=state.step, is_main=is_main, device=device,
                              desc=f"ppo {task.name}")
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
    kl_estimator = kl_k1 if config.kl_estimator == "k1" else kl_k3

    def check(step: int) -> list:
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
                save_trainable(best_file, unwrapped)
        return alarms

    # --- the loop
    alarm_note = None
    if held_out is not None and state.step == 0 and not guard.history:
        check(0)
    while state.step < total_steps:
        # 1. generate
        indices = sampler.micro_batches(state.step, rank=rank, world_size=world)[0]
        prompts = train.subset(indices)
        params = sampling_params(config, task, seed=step_seed(config.seed, state.step, rank))
        rollouts = generate_rollouts(generator, prompts, params, config.group_size, precision=precision)

        # 2. score (a completion nothing could score gets 0: GAE needs a number)
        started = time.perf_counter()
        scores = proxy.score_rollouts(task, rollouts)
        rewards = scores.total_tensor()
        score_seconds = time.perf_counter() - started

        # 3. old log-probs and values, reference log-probs, per-token rewards, GAE, whitened advantages
        started = time.perf_counter()
        keep = [not t for t in rollouts.truncated] if config.mask_truncated else None
        batches = rollout_batches(rollouts.per_completion(prompts.ids), rollouts.token_ids,
                                  batch_size=config.batch_size, pad_id=pad_id, loss_mask=keep)
        ref = no_grad_logprobs(policy, batches, precision=precision, device=device, reference=True)
        seq_kl = torch.zeros(len(rollouts))
        with torch.no_grad():
            unwrapped.eval()
            for k, b in enumerate(batches):
                b_dev = b.to(device)
                with precision.autocast():
                    old_logps, old_values = policy_and_values(unwrapped, b_dev)
                old_logps, old_values = old_logps.float(), old_values.float()
                mask = b_dev.mask
                token_rewards = kl_penalised_rewards(torch.nan_to_num(rewards[b.rows], nan=0.0).to(device),
                                                     old_logps, ref[k], mask, kl_coef=config.kl_coef,
                                                     kl=kl_estimator)
                advantages, returns = gae(token_rewards, old_values, mask, gamma=config.gamma, lam=config.lam)
                b.data |= {"old_logps": old_logps, "old_values": old_values, "advantages": advantages,
                           "returns": returns}
                seq_kl[b.rows] = (kl_k1(old_logps, ref[k]) * mask).sum(-1).cpu()
            unwrapped.train()
            whiten_advantages(batches)
        prepare_seconds = time.perf_counter() - started

        # 4. update
        results: list[StepResult] = []
        order_rng = np.random.default_rng([config.seed, state.step])
        for _ in range(config.ppo_epochs):
            order = order_rng.permutation(len(batches))
            for part in np.array_split(order, config.mini_batches):
                update = [batches[i] for i in part if batches[i].num_loss_units > 0]
                if not update:
                    continue
                try:
                    results.append(train_step(update, lambda m, b: ppo_loss(m, b, config=config), step=state.step))
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
        stats = group_stats(rewards, config.group_size)
        values = {
            "kind": "train", **stats,
            **{f"rewards/{k}": nan_mean(v) for k, v in scores.per_function.items()},
            "kl": float(seq_kl.mean()),
            "non_score_reward": float(-config.kl_coef * seq_kl.mean()),
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
        }
        postfix = {"reward": f"{stats['reward']:.3f}"} | ({"alarm": alarm_note} if alarm_note else {})
        log = state.step % config.log_every == 0 or state.step == total_steps
        monitor.log_step(state.step, step_result, log=log, postfix=postfix, **values)

        # 6. held-out check and guard
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

    # --- keep the best weights when asked or when the guard stopped the run; save the policy and the value head
    keep_best = (config.select_best or guard.should_stop) and state.best_step is not None
    selected = state.best_step if keep_best else state.step
    if keep_best and state.best_step != state.step and best_file.exists():
        from safetensors.torch import load_file

        load_trainable_state(unwrapped, load_file(best_file), where=str(best_file))
    guard_summary = guard.summary() if guard.history else None
    if is_main and guard_summary is not None:
        run.log_metrics(step=state.step, kind="guard_summary", best_step=guard_summary["best_step"],
                        selected_step=selected, alarms=[a["kind"] for a in guard_summary["alarms"]])
    metrics = {"final_step": state.step, "selected_step": selected, "best_step": state.best_step,
               "stopped_by_guard": guard.should_stop}
    if guard.history:
        chosen = next((o for o in guard.history if o.step == selected), guard.history[-1])
        metrics |= {"val_proxy_reward": chosen.proxy_reward, "val_gold": chosen.gold, "val_kl": chosen.kl,
                    "guard": guard_summary}
    summary = monitor.summary()
    busy = state.generation_seconds + state.score_seconds + summary["train_seconds"]
    rollout_cost = {"generation_seconds": round(state.generation_seconds, 2),
                    "generated_tokens": state.generated_tokens, "scoring_seconds": round(state.score_seconds, 2),
                    "generation_share": round(state.generation_seconds / busy, 4) if busy > 0 else None}
    cost = {"trainable_params": trainable_params, "total_params": total_params, "processes": world,
            "precision": precision.name, "device": device.type, **summary, **rollout_cost}
    artifact = Artifact.create(name=f"{task.name}-ppo", method="ppo", kind="adapter", base_model=task.config.model,
                               program=program, task=task, config={"method": "ppo", **config.model_dump(mode="json")},
                               metrics=metrics, cost=cost, run_dir=str(run.path))
    if is_main:
        import tempfile

        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            head = Path(tmp) / VALUE_HEAD_FILE
            save_file({k: v.detach().cpu().contiguous() for k, v in unwrapped.value_head.state_dict().items()}, head)
            artifact.save(run.path / "artifact", force=True, model=policy, extra_files={VALUE_HEAD_FILE: head})
        run.log_metrics(event="done", **{k: v for k, v in metrics.items() if k != "guard"}, **summary, **rollout_cost)
        run.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return artifact


def whiten_advantages(batches: list[RolloutBatch]) -> None:
    """Whiten the advantages over every completion token of the step (TRL whitens over the whole batch)."""
    from honellm.reward.losses import masked_whiten

    flat = torch.cat([b.data["advantages"][b.mask.to(b.data["advantages"].device).bool()] for b in batches])
    if flat.numel() < 2:
        return
    whitened = masked_whiten(flat, torch.ones_like(flat))
    start = 0
    for b in batches:
        mask = b.mask.to(b.data["advantages"].device).bool()
        n = int(mask.sum())
        b.data["advantages"] = scatter_tokens(whitened[start:start + n], mask.float())
        start += n


register_method(Method("ppo", "reward", PPOConfig, ppo, "PPO, classic RLHF: KL-penalised reward (a reward model or "
                       "the task's rewards), GAE, a value head on the LoRA policy",
                       "https://arxiv.org/abs/2203.02155", needs=("references", "rewards")))
