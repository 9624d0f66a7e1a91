"""PPO, classic RLHF: a reward model's score (or the task's reward functions) at the end of each completion, a
per-token KL penalty to the reference in the reward, a value head, GAE, and the clipped objective -> Artifact.

Papers: PPO, https://arxiv.org/abs/1707.06347; RLHF with a KL-penalised reward, Ziegler et al.
https://arxiv.org/abs/1909.08593 and InstructGPT https://arxiv.org/abs/2203.02155; GAE,
https://arxiv.org/abs/1506.02438. The pure pieces (`kl_penalised_rewards`, `gae`, `masked_whiten`,
`ppo_policy_loss`, `ppo_value_loss`) live in `honellm.reward.losses`, checked against TRL's PPO trainer.

PPO runs the one online loop (`honellm.reward.recipes.policy_gradient.train_policy_gradient`: generate, score,
the reference log-probs with the adapter disabled, updates, held-out check and guard, checkpoints, save) with
what is its own: the value head on the policy (`PolicyWithValueHead`), and the step's preparation (`ppo_prepare`:
a no-grad forward for the old log-probs and values, per-token rewards, GAE and whitened advantages); by default
one completion per prompt, and `ppo_epochs x mini_batches` updates of the policy and value losses.

Where this departs from TRL's PPO trainer (trl/experimental/ppo):
- Policy and value share one base model and one LoRA adapter: the value head is a linear layer on the policy's last
  hidden state (one forward gives both), instead of a separate value model initialised from the reward model. The
  reference is the same model with the adapter disabled. The value head starts at zero (V = 0 everywhere).
- The score goes on the last completion token, not one position past it (see `kl_penalised_rewards`).
- The reward is a reward model and/or the task's reward functions (TRL: a reward model).
- No `missing_eos_penalty` or reward whitening; `mask_truncated` drops truncated completions from the loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from honellm.artifact import Artifact
from honellm.core import fastpath
from honellm.methods.registry import Method, register_method
from honellm.reward.losses import gae, kl_k1, kl_k3, kl_penalised_rewards, ppo_policy_loss, ppo_value_loss
from honellm.reward.recipes.policy_gradient import OnlineRLConfig, PolicyGradientMethod, train_policy_gradient
from honellm.reward.rollout import (
    RolloutBatch,
    scatter_tokens,
)
from honellm.training.logprobs import LossOutput, predicting_positions

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


def ppo_prepare(model: PolicyWithValueHead, batches: list[RolloutBatch], rewards: torch.Tensor,
                ref: list[torch.Tensor], *, config: PPOConfig, precision, device) -> torch.Tensor:
    """PPO's preparation of a step: a no-grad forward for the old log-probs and values, per-token KL-penalised
    rewards, GAE and advantages whitened over the step, into each batch's `data`; returns the sequence KL (k1)."""
    kl_estimator = kl_k1 if config.kl_estimator == "k1" else kl_k3
    seq_kl = torch.zeros(sum(len(b.rows) for b in batches))
    with torch.no_grad():
        model.eval()
        for k, b in enumerate(batches):
            b_dev = b.to(device)
            with precision.autocast():
                old_logps, old_values = policy_and_values(model, b_dev)
            old_logps, old_values = old_logps.float(), old_values.float()
            mask = b_dev.mask
            # a completion nothing could score gets 0: GAE needs a number
            token_rewards = kl_penalised_rewards(torch.nan_to_num(rewards[b.rows], nan=0.0).to(device),
                                                 old_logps, ref[k], mask, kl_coef=config.kl_coef, kl=kl_estimator)
            advantages, returns = gae(token_rewards, old_values, mask, gamma=config.gamma, lam=config.lam)
            b.data |= {"old_logps": old_logps, "old_values": old_values, "advantages": advantages,
                       "returns": returns}
            seq_kl[b.rows] = (kl_k1(old_logps, ref[k]) * mask).sum(-1).cpu()
        model.train()
        whiten_advantages(batches)
    return seq_kl


def value_head_file(model: PolicyWithValueHead) -> dict[str, bytes]:
    """The value head, saved beside the policy's adapter in the artifact."""
    from safetensors.torch import save

    return {VALUE_HEAD_FILE: save({k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()})}


PPO = PolicyGradientMethod("ppo", PPOConfig, None, ppo_loss, kl_in_reward=True, sequence_units=False,
                           needs_reference=True, wrap=PolicyWithValueHead, prepare=ppo_prepare,
                           extra_files=value_head_file, shuffle_every_epoch=True, uses_tools=False)


def ppo(task, config: PPOConfig | None = None, *, out: str | Path | None = None, resume: bool = False,
        force: bool = False) -> Artifact:
    """Train the task's model with PPO on its reward; return the Artifact (the policy's LoRA adapter; the value
    head is kept beside it in `value_head.safetensors`). The loop is the online one
    (`honellm.reward.recipes.policy_gradient.train_policy_gradient`) with PPO's value head and preparation."""
    return train_policy_gradient(task, PPO, config or PPOConfig(), out=out, resume=resume, force=force)


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
