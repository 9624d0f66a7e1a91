"""Rollouts for online RL (GRPO, RLOO, PPO, rejection sampling, best-of-n): what the recipes share.

- `PolicyConfig`: the settings every recipe that samples from its policy takes (the adapter, sampling, the
  reward); the online loop's `OnlineRLConfig` is beside it in `honellm.reward.recipes.policy_gradient`.
- `PromptSet` / `encode_prompts`: a split's prompts rendered through the task's prompt program and tokenized once.
- `generate_rollouts`: `group_size` completions per prompt, batched through the `Generator` (groups consecutive).
- `RewardSource` / `proxy_reward` / `gold_reward`: reward functions and/or a reward model on completions.
- `rollout_batches` / `RolloutBatch`: completions as training micro-batches (right-padded, or packed) with a
  completion mask.
- `completion_logprobs`: per-token log-probs of the completion tokens, shape (B, T), under the policy or, with
  `reference=True`, under the same model with its adapter disabled (the reference costs no second copy).
- `held_out_check` / `observe_guard`: the reward-hacking guard's held-out measurements, and its log lines.

Layout of a rollout batch (B sequences, the completion mask (B, T) left-aligned on each completion):

    input_ids  [ prompt_0 ............ | completion_0 ..... | pad ]
    labels     [ -100 ...................| completion_0 ..... | -100 ]

`honellm.training.logprobs.token_logprobs` applies the LM head only at the positions that predict a completion
token; its flattened values, in (row, position) order, are exactly the True entries of the (B, T) mask in
row-major order, so a scatter turns them into the (B, T) tensors the losses of `honellm.reward.losses` take.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from honellm.errors import HoneError
from honellm.reward.functions import task_reward
from honellm.reward.guard import Alarm, RewardHackingGuard, distinct_n
from honellm.runtime.rewards import RewardScores, RewardSource, load_reward_model_artifact  # noqa: F401 - re-exported
from honellm.training.batching import IGNORE, Batch, TokenSequence, pack
from honellm.training.config import TrainingConfig
from honellm.training.logprobs import token_logprobs
from honellm.training.precision import Precision
from honellm.training.step import StepResult

# ---------------------------------------------------------------------------------------------------------------
# Settings


class PolicyConfig(TrainingConfig):
    """What every recipe that samples from its policy shares (GRPO, RLOO, PPO, rejection sampling): an adapter
    policy (LoRA by default), how completions are sampled, and the reward they are scored by."""

    # --- the policy: an adapter on the base; the reference is the same model with the adapter disabled
    adapter: Literal["lora", "rslora", "dora"] = Field("lora", description="the policy's adapter (the reference is "
                                                                            "the base: the adapter disabled)")
    r: int = Field(16, ge=1, description="LoRA rank of the policy")
    alpha: float = Field(32, gt=0, description="LoRA scale: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input (0 keeps the ratio exact)")
    target_modules: str | list[str] = Field("all-linear", description="modules to adapt: all-linear, attention, mlp, "
                                                                      "or a list of module names")
    lr: float = Field(2e-5, gt=0, description="peak learning rate of AdamW")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of the updates spent warming up linearly")
    schedule: Literal["cosine", "linear", "constant"] = Field("constant", description="decay after warmup")
    batch_size: int = Field(16, ge=1, description="sequences per training forward/backward (micro-batch)")
    epochs: float = Field(1.0, gt=0, description="passes over the training prompts (ignored when max_steps is set)")
    # --- sampling
    max_new_tokens: int | None = Field(None, ge=1, description="longest completion (None: the task's "
                                                               "generation.max_new_tokens)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of rollouts")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass of rollouts")
    top_k: int = Field(0, ge=0, description="top-k of rollouts (0: off)")
    generation_batch_size: int = Field(64, ge=1, description="sequences per generation forward")
    generation_backend: Literal["auto", "torch", "vllm"] = Field("auto",
                                    description="Generator backend: auto (vLLM on a CUDA GPU where installed), "
                                                "torch or vllm")
    # --- rewards
    task_rewards: bool = Field(True, description="train on the task's reward functions (`rewards:` in the task)")
    reward_model: str | None = Field(None, description="a reward-model artifact folder whose score is added to the "
                                                       "reward (hone align --method reward_model makes one)")
    reward_model_weight: float = Field(1.0, description="weight of the reward model's score in the reward")


def sampling_params(config: PolicyConfig, task, *, seed: int, temperature: float | None = None):
    """The rollouts' sampling settings, with the task's stop strings; logprobs are not needed (we recompute)."""
    from honellm.generation import SamplingParams

    return SamplingParams(max_new_tokens=config.max_new_tokens or task.config.generation.max_new_tokens,
                          temperature=config.temperature if temperature is None else temperature,
                          top_p=config.top_p, top_k=config.top_k, seed=seed, stop=tuple(task.config.generation.stop))


def step_seed(seed: int, step: int, rank: int = 0, salt: int = 0) -> int:
    """A sampling seed for (run seed, step, process): rollouts differ across steps and processes, and a resumed
    run samples what the uninterrupted one would have."""
    return (seed * 1_000_003 + step * 9_973 + rank * 101 + salt) % (2**62)


# ---------------------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class PromptSet:
    """Prompts of one split: records, the messages the model sees, their rendered text and token ids."""

    records: list
    messages: list[list[dict]]
    texts: list[str]
    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices: Sequence[int]) -> PromptSet:
        indices = [int(i) for i in indices]
        return PromptSet([self.records[i] for i in indices], [self.messages[i] for i in indices],
                         [self.texts[i] for i in indices], [self.ids[i] for i in indices])


def encode_prompts(task, program, tokenizer, split: str, *, limit: int | None = None,
                   max_prompt_tokens: int | None = None) -> PromptSet:
    """Render and tokenize a split's prompts once; a prompt longer than `max_prompt_tokens` keeps its end."""
    from honellm.data.chat import render_prompt

    records = task.split(split)[:limit] if limit else task.split(split)
    if not records:
        raise HoneError(f"the {split} split is empty", where=task.source, fix=f"add records to data.{split}")
    messages = [program.messages(task, r) for r in records]
    texts = [render_prompt(tokenizer, m) for m in messages]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if max_prompt_tokens is not None:
        ids = [list(x[-max_prompt_tokens:]) for x in ids]
    return PromptSet(list(records), messages, texts, [list(x) for x in ids])


# ---------------------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollouts:
    """`group_size` completions of each prompt, the completions of one prompt consecutive (N = prompts x group)."""

    prompts: PromptSet
    group_size: int
    completions: list  # list[honellm.generation.Completion]
    eos_ids: set[int] = field(default_factory=set)
    seconds: float = 0.0
    token_masks: list[list[int]] | None = None  # tool episodes: 1 on tokens the policy wrote, 0 on tool turns
    tool_calls: list[int] | None = None  # tool episodes: calls made per completion

    def __len__(self) -> int:
        return len(self.completions)

    def prompt_of(self, i: int) -> int:
        return i // self.group_size

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]

    @property
    def token_ids(self) -> list[list[int]]:
        """What the policy generated, end-of-turn token included (it is trained to stop)."""
        return [list(c.token_ids) for c in self.completions]

    def content_ids(self) -> list[list[int]]:
        """Completion ids without a final end-of-turn token (the reward functions' `completion_ids` column)."""
        return [ids[:-1] if ids and ids[-1] in self.eos_ids else ids for ids in self.token_ids]

    @property
    def truncated(self) -> list[bool]:
        from honellm.generation import FINISH_LENGTH

        return [c.finish_reason == FINISH_LENGTH for c in self.completions]

    @property
    def lengths(self) -> list[int]:
        return [len(c.token_ids) for c in self.completions]

    @property
    def generated_tokens(self) -> int:
        return sum(self.lengths)

    def per_completion(self, values: Sequence) -> list:
        """A per-prompt list repeated for each completion of the prompt."""
        return [values[self.prompt_of(i)] for i in range(len(self))]


def generate_rollouts(generator, prompts: PromptSet, params, group_size: int, *, precision: Precision,
                      tools=None) -> Rollouts:
    """Sample `group_size` completions per prompt in one batched call (the system prompt's KV computed once).

    With `tools` (a `honellm.generation.tools.ToolEnvironment`) each completion is a whole tool episode: the
    trajectory's tokens, a mask of the ones the policy wrote, and its final text for the rewards.
    """
    repeated = [ids for ids in prompts.ids for _ in range(group_size)]
    started = time.perf_counter()
    generator.sync_weights()  # the policy changed since the last call (a no-op for the torch engine)
    if tools is not None:
        messages = [m for m in prompts.messages for _ in range(group_size)]
        with precision.autocast():
            episodes = tools.run(generator, messages, params, prompt_ids=repeated)
        completions = [t.completion(len(p)) for t, p in zip(episodes, repeated, strict=True)]
        return Rollouts(prompts, group_size, completions, set(generator.eos_ids), time.perf_counter() - started,
                        token_masks=[t.mask for t in episodes], tool_calls=[t.tool_calls for t in episodes])
    with precision.autocast():
        completions = generator.generate(repeated, params, shared_prefix="auto")
    generator.sleep()  # vLLM's sleep mode while the trainer steps (a no-op for the torch engine)
    return Rollouts(prompts, group_size, completions, set(generator.eos_ids), time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------------------
# Rewards


def proxy_reward(task, config: PolicyConfig) -> RewardSource:
    """The reward the policy is trained on: the task's `rewards:` and/or `reward_model`; for a task with answers
    but neither, its metric on the generated text (accuracy, exact or numeric match against the reference):
    RL with a verifiable reward."""
    functions = task_reward(task) if config.task_rewards and task.config.rewards else None
    model = load_reward_model_artifact(config.reward_model, where="reward_model") if config.reward_model else None
    if functions is None and model is None and config.task_rewards:
        functions = metric_reward(task)
    if functions is None and model is None:
        raise HoneError(f"task {task.name!r} has no reward to train on", where=task.source,
                        fix="add `rewards: [{name: numeric_match}]` (or another reward) to the task, or pass "
                            "reward_model=ARTIFACT")
    return RewardSource(functions, model, config.reward_model_weight)


def gold_reward(task, reward_model: str | None = None) -> RewardSource | None:
    """What the guard watches as gold: `reward_model` (an artifact folder), else the task's `gold_rewards`, else the
    task's metric when it reads generated text (e.g. numeric_match on the reference). None: nothing to watch."""
    if reward_model:
        model = load_reward_model_artifact(reward_model, where="gold_reward_model")
        return RewardSource(None, model, 1.0, model_name="gold_reward_model")
    if task.config.gold_rewards:
        return RewardSource(task_reward(task, gold=True))
    combined = metric_reward(task)
    return RewardSource(combined) if combined is not None else None


def metric_reward(task):
    """The task's metric as a reward function over generated text against the `target` column, or None when the
    metric does not read generated text (log-likelihood choice scoring, perplexity, ...) or the task has no
    answers to check."""
    from honellm.evaluation.metrics import METRICS
    from honellm.reward.functions import CombinedReward

    metric = METRICS.get(task.metric)
    if metric is None or metric.needs != "text" or not metric.higher_is_better or task.kind not in ("sft", "reference"):
        return None
    if task.config.choices:
        # A label task is judged by the label the model commits to ("The intent is billing." says billing), as
        # the evaluator's log-likelihood choice scoring does, not by the first line being exactly the label.
        from honellm.reward.functions import choice_correct

        return CombinedReward(["choice_correct"], [choice_correct(list(task.config.choices))], [1.0])

    def score(prompts, completions, **columns):
        references = [r if r is not None else "" for r in columns["target"]]
        return [float(s) for s in metric.fn(predictions=list(completions), references=references)]

    return CombinedReward([f"metric:{metric.name}"], [score], [1.0])


# ---------------------------------------------------------------------------------------------------------------
# Training batches


@dataclass
class RolloutBatch:
    """A micro-batch of rollouts: the token batch for `token_logprobs`, the completion mask (B, T), which
    completions of the rollout it holds (`rows`), and per-row or per-token tensors the loss reads (`data`)."""

    batch: Batch
    mask: torch.Tensor  # [B, T] float, 1 on completion tokens
    rows: list[int]
    data: dict[str, torch.Tensor] = field(default_factory=dict)
    num_loss_units: int = 0  # what the training step averages over: tokens or sequences (the recipe sets it)

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    @property
    def num_completion_tokens(self) -> int:
        return int(self.mask.sum())

    def to(self, device) -> RolloutBatch:
        return RolloutBatch(self.batch.to(device), self.mask.to(device), self.rows,
                            {k: v.to(device) for k, v in self.data.items()}, self.num_loss_units)


def rollout_batches(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], *, batch_size: int,
                    pad_id: int, loss_mask: Sequence[bool] | None = None, together: int = 1,
                    token_masks: Sequence[Sequence[int]] | None = None, packed: bool = False,
                    static: dict | None = None) -> list[RolloutBatch]:
    """Micro-batches of at most `batch_size` (prompt + completion) sequences, similar lengths together.

    `loss_mask[i]` False gives completion i no loss tokens (a truncated completion under `mask_truncated`); its
    tokens still count as forwarded. Each batch's `num_loss_units` defaults to its completion tokens.
    `together` > 1 keeps each run of that many consecutive completions (a pair of online DPO) in one micro-batch,
    consecutive and in order (the batch then holds a multiple of `together`, at least one run).
    `token_masks[i]` (tool episodes) takes the loss on completion i's tokens where it is 1 only.
    `packed`: each micro-batch's sequences end to end in one row (`training.batching.pack`) instead of padded rows;
    the completion mask keeps its (B, T) layout, since a packed row's targets come in the same order (sequence,
    then position). A micro-batch with an empty prompt stays padded (a packed sequence's first token is no target).
    `static` (with `packed`): `pack`'s `width` and `slots`, every packed row of one shape (CUDA graphs).
    """
    n = len(completion_ids)
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    runs = [list(range(g, min(g + together, n))) for g in range(0, n, together)]
    runs.sort(key=lambda run: -max(lengths[i] for i in run))
    order = [i for run in runs for i in run]
    step = max(together, batch_size - batch_size % together)
    out = []
    for start in range(0, n, step):
        rows = order[start:start + step]
        width = max(lengths[i] for i in rows)
        t_max = max(1, max(len(completion_ids[i]) for i in rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), t_max), dtype=torch.float32)
        for j, i in enumerate(rows):
            p, c = list(prompt_ids[i]), list(completion_ids[i])
            ids[j, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            attention[j, :len(p) + len(c)] = 1
            if c and (loss_mask is None or loss_mask[i]):
                taken = torch.ones(len(c)) if token_masks is None else torch.tensor(token_masks[i], dtype=torch.float32)
                labels[j, len(p):len(p) + len(c)] = torch.where(taken > 0, torch.tensor(c, dtype=torch.long), IGNORE)
                mask[j, :len(c)] = taken
        if packed and all(len(prompt_ids[i]) for i in rows):
            batch = pack([TokenSequence(ids[j, :lengths[i]].tolist(), labels[j, :lengths[i]].tolist())
                          for j, i in enumerate(rows)], pad_id=pad_id, **(static or {}))
        else:
            batch = Batch(ids, attention, labels, int(attention.sum()), int(mask.sum()))
        out.append(RolloutBatch(batch, mask, rows, {}, int(mask.sum())))
    return out


def scatter_tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flattened per-token values in (row, position) order -> (B, T), zero on padding."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(mask.bool(), values)


def sampler_logprobs(completions: Sequence, mask: torch.Tensor) -> torch.Tensor:
    """The sampler's per-token log-probs (`Completion.logprobs`, asked with `SamplingParams(logprobs=True)`) laid
    out like `mask` (B, T): completion token j of row i at [i, j]; NaN where the sampler gave none (no correction
    there: `sampler_importance_weights` reads NaN as a zero difference)."""
    out = torch.full(mask.shape, float("nan"), dtype=torch.float32)
    for i, completion in enumerate(completions):
        values = list(completion.logprobs or [])[:mask.shape[1]]
        if values:
            out[i, :len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


def completion_logprobs(model, batch: RolloutBatch, *, with_entropy: bool = False):
    """Per-token log-probs (B, T) of the completion tokens under `model` (and their entropies, when asked)."""
    if batch.num_completion_tokens == 0:
        zeros = torch.zeros(batch.mask.shape, device=batch.mask.device)
        return (zeros, zeros.clone()) if with_entropy else zeros
    found = token_logprobs(model, batch.batch, with_entropy=with_entropy)
    logps = scatter_tokens(found.values, batch.mask)
    if with_entropy:
        return logps, scatter_tokens(found.entropy, batch.mask)
    return logps


@torch.no_grad()
def no_grad_logprobs(model, batches: Sequence[RolloutBatch], *, precision: Precision, device,
                     reference: bool = False) -> list[torch.Tensor]:
    """Per-token log-probs of each batch without gradients: the policy now (PPO's `old` log-probs), or with
    `reference` the base model, i.e. the same PeftModel with its adapter disabled (no second copy in memory)."""
    was_training = model.training
    model.eval()  # dropout off: the log-probs of the distribution that sampled
    try:
        with model.disable_adapter() if reference else contextlib.nullcontext():
            out = []
            for b in batches:
                with precision.autocast():
                    out.append(completion_logprobs(model, b.to(device)).float())
            return out
    finally:
        model.train(was_training)


def group_stats(rewards: torch.Tensor, group_size: int) -> dict[str, float]:
    """Reward mean/std over the batch and the share of groups whose rewards are all equal (no signal)."""
    finite = rewards[~torch.isnan(rewards)]
    stats = {"reward": float(finite.mean()) if finite.numel() else math.nan,
             "reward_std": float(finite.std()) if finite.numel() > 1 else 0.0}
    if group_size > 1:
        grouped = torch.nan_to_num(rewards, nan=0.0).view(-1, group_size)
        stats["frac_reward_zero_std"] = float((grouped.max(1).values == grouped.min(1).values).float().mean())
    return stats


def nan_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


# ---------------------------------------------------------------------------------------------------------------
# The held-out check and the guard


def held_out_check(model, generator, task, prompts: PromptSet, params, *, proxy: RewardSource,
                   gold: RewardSource | None, precision: Precision, device, batch_size: int, pad_id: int,
                   accelerator=None) -> dict[str, float | None]:
    """Generate one completion per held-out prompt with the current policy and measure what the guard watches.

    proxy: mean trained reward; gold: mean gold signal (None without one); kl: KL(policy || reference) in nats per
    sequence (k3 summed over the completion, mean over completions: unbiased when sampled at temperature 1);
    mean_length: completion tokens; distinct_n: corpus distinct-2 of the texts; entropy: mean token entropy (nats)
    of the policy on its completions. Each process takes a shard of the prompts; all get the same numbers.
    """
    from honellm.reward.losses import kl_k3

    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    mine = prompts.subset(range(rank, len(prompts), world))
    rollouts = generate_rollouts(generator, mine, params, 1, precision=precision)
    proxy_scores = proxy.score_rollouts(task, rollouts).total
    gold_scores = gold.score_rollouts(task, rollouts).total if gold is not None else [math.nan] * len(rollouts)
    batches = rollout_batches(mine.ids, rollouts.token_ids, batch_size=batch_size, pad_id=pad_id)
    policy, entropy = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batches:
                with precision.autocast():
                    logps, ent = completion_logprobs(model, b.to(device), with_entropy=True)
                policy.append(logps.float())
                entropy.append(ent.float())
    finally:
        model.train(was_training)
    reference = no_grad_logprobs(model, batches, precision=precision, device=device, reference=True)
    rows: list[dict] = [{} for _ in range(len(rollouts))]
    for b, logps, ref, ent in zip(batches, policy, reference, entropy, strict=True):
        mask = b.mask.to(logps.device)
        kl = (kl_k3(logps, ref) * mask).sum(-1)
        ent_sum = (ent * mask).sum(-1)
        for j, i in enumerate(b.rows):
            rows[i] = {"kl": float(kl[j]), "entropy_sum": float(ent_sum[j]), "tokens": float(mask[j].sum())}
    examples = [{"proxy": proxy_scores[i], "gold": gold_scores[i], "length": rollouts.lengths[i],
                 "text": rollouts.texts[i], **rows[i]} for i in range(len(rollouts))]
    if world > 1:
        from accelerate.utils import gather_object

        examples = gather_object(examples)
    tokens = sum(e["tokens"] for e in examples)
    return {
        "proxy": nan_mean([e["proxy"] for e in examples]),
        "gold": nan_mean([e["gold"] for e in examples]) if gold is not None else None,
        "kl": float(np.mean([e["kl"] for e in examples])),
        "mean_length": float(np.mean([e["length"] for e in examples])),
        "distinct_n": distinct_n([e["text"] for e in examples], n=2),
        "entropy": sum(e["entropy_sum"] for e in examples) / max(tokens, 1.0),
    }


def observe_guard(guard: RewardHackingGuard, step: int, stats: dict, monitor) -> list[Alarm]:
    """Feed one held-out check to the guard; log it (`kind: guard`) and each new alarm (`kind: alarm`)."""
    alarms = guard.observe(step, stats["proxy"], stats["gold"], kl=stats["kl"], mean_length=stats["mean_length"],
                           distinct_n=stats["distinct_n"], entropy=stats["entropy"])
    monitor.log(step, kind="guard", **{k: _round(v) for k, v in stats.items()})
    for alarm in alarms:
        monitor.log(step, kind="alarm", alarm=alarm.kind, message=alarm.message,
                    **{k: _round(v) for k, v in alarm.values.items()})
        monitor.note(f"step {step}: guard alarm {alarm.kind}: {alarm.message}")
    return alarms


def replay_guard(guard: RewardHackingGuard, history: Sequence[dict]) -> None:
    """Rebuild a guard's state on resume by observing its saved history again (the guard is deterministic)."""
    for o in history:
        guard.observe(o["step"], o["proxy_reward"], o.get("gold"), kl=o.get("kl"), mean_length=o.get("mean_length"),
                      distinct_n=o.get("distinct_n"), entropy=o.get("entropy"))


def _round(value):
    return round(value, 6) if isinstance(value, float) and math.isfinite(value) else value


# ---------------------------------------------------------------------------------------------------------------
# The policy, step results and loop state


def load_policy(task, config: PolicyConfig, precision: Precision, device):
    """The task's base model with a fresh adapter (`config.adapter`), cast by the precision policy;
    `(model, tokenizer)`. The reference is this model with its adapter disabled."""
    from honellm.reward.recipes.common import load_trainable

    model, tokenizer = load_trainable(task, config, device, precision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def merge_results(results: list[StepResult], *, seconds: float = 0.0) -> StepResult:
    """One step's optimizer updates as one StepResult: unit-weighted loss and metrics, summed tokens and time
    (`seconds` adds the step's preparation: the reference and old log-probs)."""
    if not results:
        return StepResult(math.nan, 0, 0, math.nan, math.nan, seconds, {})
    units = sum(r.units for r in results)
    weight = [r.units / max(units, 1) for r in results]
    keys = sorted({k for r in results for k in r.metrics})
    return StepResult(
        loss=sum(w * r.loss for w, r in zip(weight, results, strict=True)),
        units=units, tokens=sum(r.tokens for r in results),
        grad_norm=max(r.grad_norm for r in results), lr=results[-1].lr,
        seconds=seconds + sum(r.seconds for r in results),
        metrics={k: sum(w * r.metrics.get(k, 0.0) for w, r in zip(weight, results, strict=True)) for k in keys},
    )
