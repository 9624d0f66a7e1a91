"""The online policy-gradient loop: GRPO, RLOO, online DPO and PPO are one recipe with a few declared differences.

Read `train_policy_gradient` top to bottom: set up; then per step: generate (the Generator, batched, KV cache, vLLM
on a GPU), score, reference log-probs (the same model with its adapter disabled: no second copy), advantages,
`ppo_epochs x mini_batches` optimizer updates through the shared `TrainStep`, log, the held-out check and the
reward-hacking guard, checkpoint (the last four through the shared `honellm.training.loop.TrainingTail`); save the
artifact.

What a method declares (`PolicyGradientMethod`): how advantages are made from the step's rewards, its loss, what
its loss averages over, whether the KL to the reference is a reward penalty, and, for PPO, a value head on the
policy (`wrap`) with its own preparation of the step (`prepare`: old log-probs and values, per-token KL-penalised
rewards, GAE, whitening) and files saved beside the adapter. The methods live beside their configs:
`grpo.py` (GRPO, RLOO), `online_dpo.py`, `ppo.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator

from honellm.artifact import Artifact
from honellm.core.support import note_paths
from honellm.errors import HoneError
from honellm.program import PromptProgram
from honellm.reward.guard import GuardConfig, RewardHackingGuard
from honellm.reward.losses import (
    kl_k1,
    overlong_penalty,
    sampler_importance_weights,
    zero_variance_groups,
)
from honellm.reward.rollout import (
    PolicyConfig,
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
from honellm.training.logprobs import LossOutput
from honellm.training.loop import LoopState, start_training
from honellm.training.memory import estimate_training_memory, fit_micro_batch, parameter_bytes
from honellm.training.precision import Precision
from honellm.training.run_folder import open_run
from honellm.training.setup import (
    compile_for_graphs,
    cuda_graphs_slots,
    decide_packing,
    eager_unless,
    graph_replays,
    pick_attention,
    seed_everything,
    setup_accelerator,
)
from honellm.training.step import StepResult

ONLINE_NEEDS = ("references", "rewards")  # prompts (with whatever the rewards read); a target is optional


# ------------------------------------------------------------------------------------------------ settings


class OnlineRLConfig(PolicyConfig):
    """What the online RL recipes share (GRPO, RLOO, PPO): steps of sampling and updating, and the guard.

    One `step` is one iteration of the loop: sample `group_size` completions for each of `prompts_per_step`
    prompts, score them, then take `ppo_epochs x mini_batches` optimizer updates on them.
    """

    prompts_per_step: int = Field(8, ge=1, description="training prompts per step (on each process)")
    group_size: int = Field(8, ge=1, description="completions sampled per prompt (GRPO's G, TRL's num_generations)")
    # --- updates
    ppo_epochs: int = Field(1, ge=1, description="passes over each step's completions (GRPO's mu, TRL's num_iterations)")
    mini_batches: int = Field(1, ge=1, description="optimizer updates per pass (the completions are split this "
                                                   "many ways)")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="clip range of the probability ratio")
    mask_truncated: bool = Field(False, description="give completions cut at max_new_tokens no loss (DAPO)")
    packing: bool | None = Field(
        None, description="padding-free packing of the training micro-batches: prompt + completion sequences end to "
                          "end in one row, attention kept inside each (the same log-probs); None: on for CUDA GPUs "
                          "with a varlen attention kernel and attention=auto, off otherwise (as SFT's packing); "
                          "not for PPO, whose value head reads padded rows")
    cuda_graphs: bool = Field(
        False, description="CUDA graphs for the decoder layers of the policy's updates (torch.compile mode "
                           "reduce-overhead): every packed micro-batch one row of batch_size x the longest prompt + "
                           "completion tokens, so every update replays one recorded shape instead of launching each "
                           "kernel (a small model's update is bound by launches); reference, old log-probs and "
                           "held-out checks run eagerly; CUDA only, with packing under a varlen kernel; compiles "
                           "first (minutes); not PPO")
    # --- the held-out check and the reward-hacking guard
    guard: GuardConfig = Field(default_factory=lambda: GuardConfig(every=10),
                               description="the reward-hacking guard (every, thresholds, action: warn or stop)")
    eval_every: int | None = Field(None, ge=0, description="steps between held-out checks (None: guard.every; "
                                                           "0: never)")
    guard_prompts: int = Field(64, ge=2, description="validation prompts generated at each held-out check")
    guard_temperature: float | None = Field(None, ge=0, description="sampling temperature of held-out checks "
                                                                    "(None: the rollouts'; 0: greedy)")
    gold_reward_model: str | None = Field(None, description="a reward-model artifact the guard watches as gold "
                                                            "(never trained on); default: the task's gold_rewards, "
                                                            "else the task's metric")
    select_best: bool = Field(False, description="keep the weights of the held-out check with the best gold signal "
                                                 "(always done when the guard stops the run)")

    @model_validator(mode="after")
    def _online_sizes(self):
        if self.grad_accum != 1:
            raise ValueError("grad_accum is not used by online RL: each update accumulates over its micro-batches; "
                             "size updates with prompts_per_step, group_size and mini_batches")
        if self.mini_batches > self.prompts_per_step * self.group_size:
            raise ValueError(f"mini_batches ({self.mini_batches}) exceeds the completions per step "
                             f"({self.prompts_per_step * self.group_size})")
        return self

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * self.mini_batches

    @property
    def check_every(self) -> int:
        return self.guard.every if self.eval_every is None else self.eval_every


@dataclass
class OnlineState(LoopState):
    """What the online loop carries from step to step (the shared `LoopState` plus the guard's history and the
    rollout costs), saved in each checkpoint's state.json."""

    guard_history: list[dict] = field(default_factory=list)
    generation_seconds: float = 0.0
    generated_tokens: int = 0
    score_seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ methods


@dataclass
class Advantages:
    """Advantages (N,) and the rewards they were made from, after any KL penalty (N,)."""

    values: torch.Tensor
    rewards: torch.Tensor


@dataclass(frozen=True)
class PolicyGradientMethod:
    """What distinguishes one online method from another; everything else is `train_policy_gradient`."""

    name: str
    config: type[OnlineRLConfig]
    advantages: Callable[..., Advantages] | None
    loss: Callable[..., LossOutput]
    kl_in_reward: bool  # the KL to the reference is a reward penalty (RLOO, PPO), not a loss term (GRPO)
    sequence_units: bool  # the loss averages over sequences (RLOO), not tokens
    needs_reference: bool = False  # reference log-probs whatever kl_coef says (online DPO, PPO)
    together: int = 1  # completions kept in one micro-batch, in order (online DPO's pairs)
    drop_ties: bool = False  # always leave out groups whose rewards are all equal (online DPO: no preference)
    # `units(config, batch, max_new_tokens)`: what the loss of a micro-batch averages over (None: its completion
    # tokens, as `rollout_batches` counts them)
    units: Callable[..., int] | None = None
    resolve: Callable[..., OnlineRLConfig] | None = None  # `resolve(config, max_new_tokens)`: defaults filled in
    # --- PPO: a value head on the policy
    wrap: Callable[..., torch.nn.Module] | None = None  # `wrap(policy)`: the module that trains (policy + head)
    # `prepare(model, batches, rewards, ref, *, config, precision, device) -> seq_kl`: fills each batch's data
    # (old log-probs and values, advantages, returns) in place of `advantages`
    prepare: Callable[..., torch.Tensor] | None = None
    extra_files: Callable[..., dict] | None = None  # `extra_files(model) -> {name: bytes}` saved beside the adapter
    shuffle_every_epoch: bool = False  # shuffle the micro-batches even with one pass (PPO)
    uses_tools: bool = True  # a task with tools makes every completion a tool episode


def train_policy_gradient(task, method: PolicyGradientMethod, config: OnlineRLConfig, *,
                          out: str | Path | None = None, resume: bool = False, force: bool = False) -> Artifact:
    """An online policy-gradient method on `task` (see the module docstring); the run folder is laid out as
    `hone tune`'s."""
    if not isinstance(config, method.config):
        raise TypeError(f"{method.name} takes a {method.config.__name__}, not a {type(config).__name__}")
    if config.cuda_graphs and method.wrap is not None:  # refused before the run folder exists
        raise HoneError(f"cuda_graphs=true: {method.name}'s value head reads padded rows", where="cuda_graphs",
                        fix="drop cuda_graphs=true")

    # --- processes, precision, run folder
    accelerator = setup_accelerator()
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    precision = Precision.resolve(config.precision, device)
    run = open_run(task, method.name, config, out=out, resume=resume, force=force, accelerator=accelerator)

    # --- the policy: the base model with a LoRA adapter (frozen weights in the compute dtype, LoRA in fp32), and
    # for PPO a value head on it (one module, so that DDP sees the head's parameters)
    seed_everything(config.seed)
    policy, tokenizer = load_policy(task, config, precision, device)
    model = method.wrap(policy).to(device) if method.wrap is not None else policy
    _, trainable_params, total_params = parameter_bytes(model)

    # --- prompts, rewards, held-out set
    program = PromptProgram.from_task(task)
    max_new_tokens = config.max_new_tokens or task.config.generation.max_new_tokens
    if method.resolve is not None:
        config = method.resolve(config, max_new_tokens)  # the loss's defaults (dapo: clip-higher, dynamic sampling)
    max_prompt = max(8, config.max_length - max_new_tokens)
    train = encode_prompts(task, program, tokenizer, "train", max_prompt_tokens=max_prompt)
    tools = None
    if task.config.tools and method.uses_tools:  # every completion is a tool episode of up to tool_turns turns
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
    if method.wrap is None:
        packing, unpacked_because = decide_packing(config.packing, config.attention, policy, device,
                                                   precision.compute_dtype)
    elif config.packing:
        raise HoneError(f"packing=true: {method.name}'s value head reads padded rows", where="packing",
                        fix="drop packing=true")
    else:  # PPO: padded rows for its value head
        packing, unpacked_because = False, None
    attention = pick_attention(policy, config.attention, device=device, longest=longest, packed=packing,
                               compute_dtype=precision.compute_dtype)

    def estimate_for(batch: int, length: int, checkpointing: bool):  # a packed micro-batch: one row of them all
        rows, width = (1, batch * min(length, longest)) if packing else (batch, min(length, longest))
        return estimate_training_memory(model, micro_batch_size=rows, seq_len=width,
                                        gradient_checkpointing=checkpointing, loss_tokens=batch * max_new_tokens,
                                        compute_dtype=precision.compute_dtype, distributed=world > 1,
                                        device_type=device.type, attention=attention)

    # too large for the memory at hand: smaller micro-batches (each update keeps its completions), then gradient
    # checkpointing, said in one line
    plan = fit_micro_batch(estimate_for, batch_size=config.batch_size, seq_len=longest, grad_accum=1,
                           gradient_checkpointing=config.gradient_checkpointing, device=device,
                           limit_gb=config.memory_limit_gb, accumulate=False)
    config, memory = plan.apply(config, policy, run if is_main else None), plan.estimate
    static = {}  # cuda_graphs=true: every packed micro-batch one row of `width` tokens and `slots` sequences
    if config.cuda_graphs:
        sequences = max(config.batch_size, method.together)
        static = {"width": sequences * longest, "slots": cuda_graphs_slots(
            policy, device, precision.compute_dtype, packing=packing, unpacked_because=unpacked_because,
            attention=attention, sequences=sequences)}
        compile_for_graphs(policy)

    # --- optimizer, schedule (over every update), accelerator, resume, generator
    training = start_training(accelerator, model, config, run, total_steps=total_steps, resume=resume,
                              precision=precision, desc=f"{method.name} {task.name}", schedule_steps=total_updates,
                              state_type=OnlineState)
    model, state, monitor = training.model, training.state, training.monitor
    guard = RewardHackingGuard(config.guard)
    replay_guard(guard, state.guard_history)  # a resumed run's guard knows the checks before
    unwrapped = accelerator.unwrap_model(model)
    policy = unwrapped.policy if method.wrap is not None else unwrapped  # generation and the reference run on it
    from honellm.generation import Generator

    generator = Generator(policy, tokenizer, backend=config.generation_backend,
                          batch_size=config.generation_batch_size)
    # Importance-sampling correction of the sampler's numbers (GRPO family, plain rollouts): vLLM's by default.
    correct = getattr(config, "vllm_importance_sampling_correction", False)
    correct = tools is None and (generator.backend == "vllm" if correct is None else bool(correct))
    if is_main:
        run.log_metrics(event="resume" if training.resumed_from else "start", step=state.step,
                        total_steps=total_steps, updates_per_step=config.updates_per_step, processes=world,
                        precision=precision.name, trainable_params=trainable_params, total_params=total_params,
                        generation_backend=generator.backend, decoding=generator.decoding, proxy_reward=proxy.names,
                        gold=gold.names if gold is not None else None, estimated_peak_memory_bytes=memory.total,
                        attention=attention, packing=packing, unpacked_because=unpacked_because,
                        cuda_graphs=bool(static), static_width=static.get("width"))
        # which paths the policy takes, once (honellm.core.support); PPO's value-head wrapper has no config to check
        note_paths(policy, run, monitor.note)
    pad_id = generator.pad_id
    bar = {"postfix": {}, "loss": math.nan, "alarm": None}  # what the progress bar shows after a check

    def check(step: int) -> None:
        """The held-out check: measure and let the guard judge (it logs both; the tail keeps the best weights)."""
        params = sampling_params(config, task, seed=step_seed(config.seed, 0, salt=7),
                                 temperature=config.guard_temperature)
        with eager_unless(bool(static)):  # padded scoring batches: not the recorded shape
            stats = held_out_check(policy, generator, task, held_out, params, proxy=proxy, gold=gold,
                                   precision=precision, device=device, batch_size=config.batch_size, pad_id=pad_id,
                                   accelerator=accelerator)
        alarms = observe_guard(guard, step, stats, monitor)
        state.guard_history = [dict(o) for o in guard.summary()["history"]]
        if alarms and step > 0:
            bar["alarm"] = ",".join(a.kind for a in alarms)
            monitor.bar.set_postfix({"loss": f"{bar['loss']:.4f}"} | bar["postfix"] | {"alarm": bar["alarm"]})

    def judge(step: int, scores) -> tuple[bool, bool]:
        """The weights of the best gold signal are the best; the guard may stop the run."""
        stop = guard.should_stop and step > 0
        if stop:
            monitor.log(step, event="guard_stop", best_step=guard.best_step, alarms=[a.kind for a in guard.alarms])
            monitor.note(f"the guard stopped the run at step {step}; keeping step {guard.best_step}")
        return guard.best_step == step, stop

    tail = training.tail(evaluate=check, eval_every=check_every, judge=judge, always_keep_best=True,
                         save_every=config.save_every if config.save_every is not None else check_every)

    # --- the loop
    if held_out is not None and state.step == 0 and not guard.history:
        tail.evaluate_now(0)  # the starting policy: the guard's baseline and the best checkpoint until beaten
    while tail.running():
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
                                  token_masks=[rollouts.token_masks[i] for i in rows] if tools else None,
                                  packed=packing, static=static)
        for b in batches:
            b.rows = [rows[r] for r in b.rows]  # back to indices of the whole rollout
        kl_coef = getattr(config, "kl_coef", 0.0)
        need_ref = method.needs_reference or kl_coef > 0
        with eager_unless(bool(static)):  # no-grad passes (the adapter off for the reference): not recorded
            ref = no_grad_logprobs(policy, batches, precision=precision, device=device, reference=True) \
                if need_ref else None
            if method.prepare is not None:  # PPO: old log-probs and values, KL-penalised token rewards, GAE
                seq_kl = method.prepare(unwrapped, batches, rewards, ref, config=config, precision=precision,
                                        device=device)
            else:
                seq_kl = _sequence_advantages(method, config, policy, batches, rollouts, rewards, ref,
                                              correct=correct, precision=precision, device=device,
                                              max_new_tokens=max_new_tokens)
        prepare_seconds = time.perf_counter() - started

        # 4. update: ppo_epochs passes, each split into mini_batches optimizer updates
        results: list[StepResult] = []
        order_rng = np.random.default_rng([config.seed, state.step])
        shuffle = config.ppo_epochs > 1 or method.shuffle_every_epoch
        loss = functools.partial(method.loss, config=config)
        loss = graph_replays(loss) if static else loss
        for _ in range(config.ppo_epochs):
            order = order_rng.permutation(len(batches)) if shuffle else np.arange(len(batches))
            for part in np.array_split(order, config.mini_batches):
                update = [batches[i] for i in part if batches[i].num_loss_units > 0]
                if not update:  # every completion of this update is masked (truncated, under mask_truncated)
                    continue
                results.append(tail.step(training.step, update, loss))

        # 5. log (6. the held-out check and the guard, 7. checkpoint: the tail's)
        step_result = merge_results(results, seconds=prepare_seconds)
        state.generation_seconds += rollouts.seconds
        state.generated_tokens += rollouts.generated_tokens
        state.score_seconds += score_seconds
        stats = group_stats(task_rewards, config.group_size)
        values = _train_line(stats, scores, rollouts, step_result, score_seconds=score_seconds,
                             prepare_seconds=prepare_seconds, updates=len(results))
        if method.prepare is not None:  # PPO's names (TRL's): the sequence KL and its penalty
            values |= {"kl": float(seq_kl.mean()), "non_score_reward": float(-config.kl_coef * seq_kl.mean())}
        else:
            values["dropped_groups"] = float(dropped.float().mean())
        if tools:
            values["tool_calls"] = float(np.mean(rollouts.tool_calls))
        if shaping:
            values["rewards/overlong"] = nan_mean((rewards - task_rewards).tolist())
        if seq_kl is not None and method.prepare is None:
            values["kl_sequence"] = float(seq_kl.mean())
        bar["postfix"] = {"reward": f"{stats['reward']:.3f}"} | ({"alarm": bar["alarm"]} if bar["alarm"] else {})
        bar["loss"] = step_result.loss
        if tail.end_step(step_result, postfix=bar["postfix"], **values):
            break

    # --- keep the best weights (by the gold signal) when asked or when the guard stopped the run; save
    selected = tail.finish(keep_best=config.select_best or guard.should_stop)
    guard_summary = guard.summary() if guard.history else None
    if is_main and guard_summary is not None:
        run.log_metrics(step=state.step, kind="guard_summary", best_step=guard_summary["best_step"],
                        selected_step=selected, alarms=[a["kind"] for a in guard_summary["alarms"]])
    metrics, summary, rollout_cost = _results(state, guard, selected, monitor)
    cost = {"trainable_params": trainable_params, "total_params": total_params, "processes": world,
            "precision": precision.name, "device": device.type, **summary, **rollout_cost}
    artifact = Artifact.create(name=f"{task.name}-{method.name}", method=method.name, kind="adapter",
                               base_model=task.config.model, program=program, task=task,
                               config={"method": method.name, **config.model_dump(mode="json")},
                               metrics=metrics, cost=cost, run_dir=str(run.path))
    if is_main:
        extra = method.extra_files(unwrapped) if method.extra_files is not None else None
        artifact.save(run.path / "artifact", force=True, model=policy, extra_files=extra)
        run.log_metrics(event="done", **{k: v for k, v in metrics.items() if k != "guard"}, **summary,
                        **rollout_cost, decoding=generator.decoding)
        run.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return artifact


def _results(state: OnlineState, guard: RewardHackingGuard, selected: int, monitor) -> tuple[dict, dict, dict]:
    """The artifact's metrics (steps, the guard's verdict and the selected check's scores), the monitor's summary
    and the rollouts' cost."""
    metrics = {"final_step": state.step, "selected_step": selected, "best_step": state.best_step,
               "stopped_by_guard": guard.should_stop}
    if guard.history:
        chosen = next((o for o in guard.history if o.step == selected), guard.history[-1])
        metrics |= {"val_proxy_reward": chosen.proxy_reward, "val_gold": chosen.gold, "val_kl": chosen.kl}
        metrics["guard"] = guard.summary()
    summary = monitor.summary()
    rollout_cost = {"generation_seconds": round(state.generation_seconds, 2),
                    "generated_tokens": state.generated_tokens, "scoring_seconds": round(state.score_seconds, 2)}
    busy = state.generation_seconds + state.score_seconds + summary["train_seconds"]
    rollout_cost["generation_share"] = round(state.generation_seconds / busy, 4) if busy > 0 else None
    return metrics, summary, rollout_cost


def _train_line(stats: dict, scores, rollouts, step_result: StepResult, *, score_seconds: float,
                prepare_seconds: float, updates: int) -> dict:
    """The fields of a step's `kind: train` line every online method logs: rewards, completions, where the time
    went (generation, scoring, reference and old log-probs, updates) and the two speeds."""
    train_seconds = step_result.seconds
    step_seconds = rollouts.seconds + score_seconds + train_seconds
    return {
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
        "updates": updates,
    }


def _sequence_advantages(method: PolicyGradientMethod, config, policy, batches, rollouts, rewards, ref, *,
                         correct: bool, precision: Precision, device, max_new_tokens: int) -> torch.Tensor | None:
    """The step's preparation for methods with one advantage per completion (GRPO, RLOO, online DPO): old
    log-probs where needed, the sequence KL, advantages, the sampler's importance weights and each micro-batch's
    loss units, into each batch's `data`. Returns the sequence KL (None without reference or old log-probs)."""
    kl_coef = getattr(config, "kl_coef", 0.0)
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
        if method.units is not None:
            b.num_loss_units = method.units(config, b, max_new_tokens)
    return seq_kl
