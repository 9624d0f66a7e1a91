"""GRPO and RLOO: online policy-gradient RL with group baselines, on a LoRA policy, with reward functions and/or a
reward model -> Artifact.

GRPO (DeepSeekMath, https://arxiv.org/abs/2402.03300): for each prompt sample a group of G completions, score
them, and use the group-normalised reward `(r - mean) / (std + eps)` as every token's advantage; maximise the
clipped surrogate `min(rho A, clip(rho, 1 - eps, 1 + eps) A)` per token, minus `kl_coef` times the k3 estimate of
KL(policy || reference) per token.

RLOO (Ahmadian et al., https://arxiv.org/abs/2402.14740): the baseline of each completion is the mean reward of
the *other* G - 1 completions of its prompt; the KL to the reference is a penalty in the reward (the sequence's
summed log-ratio, k1), and the probability ratio is taken per sequence, as TRL's `RLOOTrainer` does.

Both run the one online loop, `honellm.reward.recipes.policy_gradient.train_policy_gradient` (generate, score,
reference log-probs, advantages, updates, the held-out check and guard, checkpoints); this module declares what
is theirs: configs, advantages, losses and what each loss averages over.

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

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from honellm.artifact import Artifact
from honellm.methods.registry import Method, register_method
from honellm.reward.losses import (
    PolicyLossSettings,
    get_policy_loss,
    grpo_advantages,
    policy_gradient_loss,
    policy_loss,
    rloo_advantages,
)
from honellm.reward.recipes.policy_gradient import (
    ONLINE_NEEDS,
    Advantages,
    OnlineRLConfig,
    PolicyGradientMethod,
    train_policy_gradient,
)
from honellm.reward.rollout import (
    RolloutBatch,
    completion_logprobs,
)
from honellm.training.logprobs import LossOutput, metric_sums

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
    return LossOutput(loss * units, units, metric_sums(metrics, units, _METRIC_NAMES))


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
    return LossOutput(loss, units, metric_sums(metrics, units, _METRIC_NAMES))


_METRIC_NAMES = {"clip_ratio/region_mean": "clip_fraction", "clip_ratio/low_mean": "clip_low",
                 "clip_ratio/high_mean": "clip_high"}


def rloo_units(config: RLOOConfig, batch: RolloutBatch, max_new_tokens: int) -> int:
    """RLOO's loss averages over sequences: the rows of the micro-batch with a loss token."""
    return int(batch.mask.sum(-1).gt(0).sum())


def _resolve_grpo(config: GRPOConfig, max_new_tokens: int) -> GRPOConfig:
    return config.resolved(max_new_tokens)


GRPO = PolicyGradientMethod("grpo", GRPOConfig, grpo_step_advantages, grpo_loss, kl_in_reward=False,
                            sequence_units=False, units=loss_units, resolve=_resolve_grpo)
RLOO = PolicyGradientMethod("rloo", RLOOConfig, rloo_step_advantages, rloo_loss, kl_in_reward=True,
                            sequence_units=True, units=rloo_units)


def grpo(task, config: GRPOConfig | None = None, *, out: str | Path | None = None, resume: bool = False,
         force: bool = False) -> Artifact:
    """Train the task's model with GRPO on its reward; return the Artifact (a LoRA adapter + the prompt program)."""
    return train_policy_gradient(task, GRPO, config or GRPOConfig(), out=out, resume=resume, force=force)


def rloo(task, config: RLOOConfig | None = None, *, out: str | Path | None = None, resume: bool = False,
         force: bool = False) -> Artifact:
    """Train the task's model with RLOO on its reward; return the Artifact."""
    return train_policy_gradient(task, RLOO, config or RLOOConfig(), out=out, resume=resume, force=force)


register_method(Method("grpo", "reward", GRPOConfig, grpo, "group relative policy optimisation: online RL on the "
                       "task's rewards, group-normalised advantages, k3 KL in the loss",
                       "https://arxiv.org/abs/2402.03300", needs=ONLINE_NEEDS))
register_method(Method("rloo", "reward", RLOOConfig, rloo, "REINFORCE leave-one-out: online RL on the task's "
                       "rewards, KL penalty in the reward", "https://arxiv.org/abs/2402.14740", needs=ONLINE_NEEDS))
