"""Rejection-sampling fine-tuning (RFT): sample n answers per training prompt, keep the best by reward, and
fine-tune on them with the SFT recipe's components -> Artifact.

Papers: RFT for math reasoning, Yuan et al. https://arxiv.org/abs/2308.01825; RAFT, Dong et al.
https://arxiv.org/abs/2304.06767; iterated, ReST-EM, Singh et al. https://arxiv.org/abs/2312.06585.

Read `rft` top to bottom: set up; then for each of `rounds`: sample `n` completions per prompt with the current
policy, score them, keep each prompt's best when its reward reaches `min_reward`, write the kept samples to
`samples-round-K.jsonl`, and run supervised steps on them (the SFT recipe's `encode_conversation`,
`LengthGroupedBatches`, `TrainStep` and `sft_loss`); then a held-out check (greedy answers on validation, the
proxy and gold rewards). Save the LoRA adapter.

Where this departs from the papers: the policy is a LoRA adapter that keeps training across rounds (RAFT), where
ReST-EM restarts each round from the base model; a prompt contributes at most its single best sample (RFT keeps
every distinct correct one). Runs do not resume from a checkpoint (each round is cheap to redo).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from pydantic import Field

from honellm.artifact import Artifact
from honellm.core.support import note_paths
from honellm.errors import HoneError
from honellm.methods.registry import Method, register_method
from honellm.program import PromptProgram
from honellm.reward.rollout import (
    PolicyConfig,
    encode_prompts,
    generate_rollouts,
    gold_reward,
    held_out_check,
    load_policy,
    nan_mean,
    proxy_reward,
    sampling_params,
    step_seed,
)
from honellm.training.batching import LengthGroupedBatches, collate, encode_conversation
from honellm.training.logprobs import sft_loss
from honellm.training.loop import LoopState, TrainingTail
from honellm.training.memory import estimate_training_memory, fit_micro_batch, parameter_bytes
from honellm.training.monitor import TrainingMonitor
from honellm.training.optim import build_optimizer, build_schedule, warmup_steps_for
from honellm.training.precision import Precision
from honellm.training.setup import pick_attention, seed_everything, setup_accelerator
from honellm.training.step import TrainStep


class RFTConfig(PolicyConfig):
    """Rejection-sampling fine-tuning: best-of-n samples as SFT data, for one or more rounds."""

    n: int = Field(8, ge=1, description="completions sampled per training prompt")
    rounds: int = Field(1, ge=1, description="sample-then-fine-tune rounds (each samples from the policy so far)")
    min_reward: float | None = Field(1.0, description="keep a prompt's best completion only if its reward is at "
                                                      "least this (None: always keep the best)")
    prompts_per_round: int | None = Field(None, ge=1, description="training prompts sampled per round (None: all)")
    epochs: float = Field(2.0, gt=0, description="passes over each round's kept samples")
    lr: float = Field(1e-4, gt=0, description="peak learning rate of AdamW")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch")
    temperature: float = Field(0.8, gt=0, description="sampling temperature of the n completions")
    eval_prompts: int = Field(64, ge=0, description="validation prompts answered greedily after each round (0: none)")


def rft(task, config: RFTConfig | None = None, *, out: str | Path | None = None, resume: bool = False,
        force: bool = False) -> Artifact:
    """Rejection-sampling fine-tuning of the task's model on its reward; return the Artifact (a LoRA adapter)."""
    config = config or RFTConfig()
    if resume:
        raise HoneError("rejection-sampling runs do not resume", where="--resume",
                        fix="start the run again (with --force to replace its folder)")
    from honellm.training.run_folder import open_run

    # --- processes, precision, run folder, policy
    accelerator = setup_accelerator()
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    precision = Precision.resolve(config.precision, device)
    run = open_run(task, "rft", config, out=out, resume=False, force=force, accelerator=accelerator)
    seed_everything(config.seed)
    model, tokenizer = load_policy(task, config, precision, device)
    _, trainable_params, total_params = parameter_bytes(model)

    # --- prompts and rewards
    program = PromptProgram.from_task(task)
    max_new_tokens = config.max_new_tokens or task.config.generation.max_new_tokens
    max_prompt = max(8, config.max_length - max_new_tokens)
    train = encode_prompts(task, program, tokenizer, "train", max_prompt_tokens=max_prompt)
    held_out = (encode_prompts(task, program, tokenizer, "validation", limit=config.eval_prompts,
                               max_prompt_tokens=max_prompt)
                if config.eval_prompts and task.has_split("validation") else None)
    proxy = proxy_reward(task, config)
    gold = gold_reward(task) if held_out is not None else None
    # attention kernel of the training forward (as SFT picks it) and memory pre-flight; +8: a margin for what the
    # chat template adds after an answer (end of turn)
    longest = max(map(len, train.ids)) + max_new_tokens + 8
    attention = pick_attention(model, config.attention, device=device, longest=longest)
    plan = fit_micro_batch(
        lambda b, length, ckpt: estimate_training_memory(
            model, micro_batch_size=b, seq_len=length, gradient_checkpointing=ckpt, loss_tokens=b * max_new_tokens,
            compute_dtype=precision.compute_dtype, distributed=world > 1, device_type=device.type,
            attention=attention),
        batch_size=config.batch_size, seq_len=longest, grad_accum=config.grad_accum,
        gradient_checkpointing=config.gradient_checkpointing, device=device, limit_gb=config.memory_limit_gb)
    config, memory = plan.apply(config, model, run if is_main else None), plan.estimate

    # --- optimizer, accelerator, generator
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
    model, optimizer = accelerator.prepare(model, optimizer)
    policy = accelerator.unwrap_model(model)
    from honellm.generation import Generator

    generator = Generator(policy, tokenizer, backend=config.generation_backend,
                          batch_size=config.generation_batch_size)
    slots = world * config.grad_accum
    per_round = config.prompts_per_round or len(train)
    planned = config.max_steps or max(1, math.ceil(config.epochs * per_round / (config.batch_size * slots)))
    monitor = TrainingMonitor(run, total_steps=planned * config.rounds, is_main=is_main, device=device,
                              desc=f"rft {task.name}")
    if is_main:
        run.log_metrics(event="start", rounds=config.rounds, n=config.n, processes=world, precision=precision.name,
                        trainable_params=trainable_params, total_params=total_params,
                        generation_backend=generator.backend, decoding=generator.decoding, proxy_reward=proxy.names,
                        estimated_peak_memory_bytes=memory.total)
        note_paths(model, run, monitor.note)  # which paths the model takes, once (honellm.core.support)
    step, generation_seconds, generated_tokens, kept_total = 0, 0.0, 0, 0
    history = []

    def check(at_step: int, round_index: int) -> dict | None:
        if held_out is None:
            return None
        params = sampling_params(config, task, seed=config.seed, temperature=0.0)
        stats = held_out_check(policy, generator, task, held_out, params, proxy=proxy, gold=gold,
                               precision=precision, device=device, batch_size=config.batch_size,
                               pad_id=generator.pad_id, accelerator=accelerator)
        monitor.log(at_step, kind="eval", round=round_index, **stats)
        monitor.note(f"round {round_index}: validation proxy {stats['proxy']:.3f}"
                     + (f", gold {stats['gold']:.3f}" if stats["gold"] is not None else ""))
        history.append({"step": at_step, "round": round_index, **stats})
        return stats

    check(0, 0)
    for round_index in range(1, config.rounds + 1):
        # 1. sample n completions per prompt (this process's share), score, keep each prompt's best
        order = np.random.default_rng([config.seed, round_index]).permutation(len(train))[:per_round]
        prompts = train.subset(order[rank::world])
        params = sampling_params(config, task, seed=step_seed(config.seed, round_index, rank))
        rollouts = generate_rollouts(generator, prompts, params, config.n, precision=precision)
        generation_seconds += rollouts.seconds
        generated_tokens += rollouts.generated_tokens
        scores = proxy.score_rollouts(task, rollouts).total
        kept = []
        for p in range(len(prompts)):
            group = list(range(p * config.n, (p + 1) * config.n))
            best = max(group, key=lambda j: (scores[j] if not math.isnan(scores[j]) else -math.inf, -j))
            if math.isnan(scores[best]) or (config.min_reward is not None and scores[best] < config.min_reward):
                continue
            kept.append({"messages": prompts.messages[p], "completion": rollouts.texts[best],
                         "reward": scores[best], "where": getattr(prompts.records[p], "where", None)})
        if world > 1:
            from accelerate.utils import gather_object

            kept = gather_object(kept)
        kept_total += len(kept)
        monitor.log(step, kind="samples", round=round_index, sampled=len(rollouts) * world, kept=len(kept),
                    reward=nan_mean(scores), best_reward=nan_mean([k["reward"] for k in kept]) if kept else None,
                    generation_seconds=round(rollouts.seconds, 3))
        if is_main:
            with open(run.path / f"samples-round-{round_index}.jsonl", "w", encoding="utf-8") as handle:
                for k in kept:
                    handle.write(json.dumps(k, ensure_ascii=False) + "\n")
        if len(kept) < slots:
            monitor.note(f"round {round_index}: {len(kept)} samples reached min_reward={config.min_reward}; "
                         "nothing to train on this round")
            check(step, round_index)
            continue

        # 2. supervised fine-tuning on the kept samples (the SFT recipe's components)
        sequences = [encode_conversation(tokenizer, k["messages"], k["completion"], max_length=config.max_length)
                     for k in kept]
        sampler = LengthGroupedBatches([len(s) for s in sequences], config.batch_size * slots,
                                       seed=config.seed + round_index, slots=slots)
        steps = config.max_steps or max(1, math.ceil(config.epochs * sampler.steps_per_epoch))
        warmup = warmup_steps_for(steps, warmup_ratio=config.warmup_ratio, warmup_steps=config.warmup_steps)
        schedule = build_schedule(optimizer, total_steps=steps, warmup_steps=warmup, schedule=config.schedule,
                                  min_ratio=config.min_lr_ratio)
        train_step = TrainStep(accelerator, model, optimizer, schedule, precision=precision,
                               max_grad_norm=config.max_grad_norm)
        mean_kept = float(np.mean([k["reward"] for k in kept]))
        # the shared tail counts, logs and watches the budget (no checkpoints: a round is cheap to redo)
        tail = TrainingTail(accelerator=accelerator, run=run, monitor=monitor, state=LoopState(step=step),
                            total_steps=step + steps, log_every=config.log_every, max_seconds=config.max_seconds)
        for s in range(steps):
            micro = [collate([sequences[i] for i in index], tokenizer.pad_token_id)
                     for index in sampler.micro_batches(s, rank=rank, world_size=world, grad_accum=config.grad_accum)]
            result = tail.step(train_step, micro, sft_loss)
            tail.end_step(result, postfix={"round": round_index}, kind="train", round=round_index, reward=mean_kept)
            if tail.out_of_time:
                break
        step = tail.state.step
        check(step, round_index)
        if tail.out_of_time:
            break
    monitor.close()
    accelerator.wait_for_everyone()

    # --- save
    summary = monitor.summary()
    metrics = {"rounds": config.rounds, "kept_samples": kept_total, "final_step": step}
    if history:
        metrics |= {"val_proxy_reward": history[-1]["proxy"], "val_gold": history[-1]["gold"],
                    "val_proxy_reward_start": history[0]["proxy"], "val_gold_start": history[0]["gold"]}
    busy = generation_seconds + summary["train_seconds"]
    cost = {"trainable_params": trainable_params, "total_params": total_params, "processes": world,
            "precision": precision.name, "device": device.type, **summary,
            "generation_seconds": round(generation_seconds, 2), "generated_tokens": generated_tokens,
            "generation_share": round(generation_seconds / busy, 4) if busy > 0 else None}
    artifact = Artifact.create(name=f"{task.name}-rft", method="rft", kind="adapter", base_model=task.config.model,
                               program=program, task=task, config={"method": "rft", **config.model_dump(mode="json")},
                               metrics=metrics, cost=cost, run_dir=str(run.path))
    if is_main:
        artifact.save(run.path / "artifact", force=True, model=policy)
        run.log_metrics(event="done", **metrics, **summary)
        run.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return artifact


register_method(Method("rft", "reward", RFTConfig, rft, "rejection-sampling fine-tuning: sample n, keep the best "
                       "by reward, supervised fine-tuning on them", "https://arxiv.org/abs/2308.01825",
                       needs=("references", "rewards")))
