"""Online DPO: the policy samples two answers per prompt, a judge, a reward model or the task's reward functions
pick the better, and DPO trains on the fresh pair -> Artifact.

Guo et al., "Direct Language Model Alignment from Online AI Feedback", https://arxiv.org/abs/2402.04792 (Alg. 1);
TRL's `OnlineDPOTrainer`. Offline DPO learns from pairs someone else's model wrote; online DPO's pairs come from the
policy itself at every step, so the preference signal stays on the policy's own distribution.

It is the online RL loop of `honellm.reward.recipes.policy_gradient.train_policy_gradient` with two differences, declared in
its `PolicyGradientMethod`: every step samples pairs (`group_size=2`) kept together in one micro-batch, and the
"advantage" of each answer says which of its pair won (+1) or lost (-1); pairs whose two rewards are equal carry
no preference and are left out of the update (dynamic sampling). The loss is a registered preference loss
(`honellm.reward.losses`: `dpo` or `ipo`) on the pair's summed log-probs against the reference (the adapter
disabled). The reward-hacking guard, the held-out check, checkpoints, resume and budgets are the loop's.

The preference comes from the task's `rewards:`: a judge (`{name: judge, judge: {...}}`, calibrated before its
first use; `honellm.evaluation.judges`), reward functions, and/or `reward_model=` (a reward-model artifact).

Where this departs from TRL: TRL asks its judge once per pair in one order; a Hone judge is asked in both orders
and averaged (its position bias cancels). TRL's `missing_eos_penalty` is the task's `mask_truncated`-free
equivalent of an overlong reward function; not built in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from honellm.artifact import Artifact
from honellm.methods.registry import Method, register_method
from honellm.reward.losses import PreferenceLogps, get_preference_loss
from honellm.reward.recipes.policy_gradient import (
    ONLINE_NEEDS,
    Advantages,
    OnlineRLConfig,
    PolicyGradientMethod,
    train_policy_gradient,
)
from honellm.reward.rollout import RolloutBatch, completion_logprobs
from honellm.training.logprobs import LossOutput, metric_sums


class OnlineDPOConfig(OnlineRLConfig):
    """Online DPO: pairs sampled from the policy each step, ranked by the task's reward or judge, a DPO loss."""

    loss: Literal["dpo", "ipo"] = Field("dpo", description="the preference loss on each fresh pair (TRL's "
                                                            "loss_type sigmoid or ipo)")
    beta: float = Field(0.1, gt=0, description="the DPO temperature (TRL's beta)")
    group_size: int = Field(2, ge=2, le=2, description="answers sampled per prompt: a pair")

    @model_validator(mode="after")
    def _pairs(self):
        if self.mask_truncated:
            raise ValueError("online DPO compares whole answers; mask_truncated would leave an answer without log-probs"
                             " (penalise overlong answers with a reward instead)")
        return self


def pair_advantages(rewards: torch.Tensor, *, config: OnlineDPOConfig, seq_kl: torch.Tensor | None) -> Advantages:
    """+1 for the better answer of each pair, -1 for the worse, 0 for both of a tie (NaN rewards lose)."""
    pairs = torch.nan_to_num(rewards, nan=float("-inf")).view(-1, 2)
    sign = torch.sign(pairs[:, 0] - pairs[:, 1])
    sign = torch.nan_to_num(sign, nan=0.0)  # -inf vs -inf
    return Advantages(torch.stack([sign, -sign], dim=1).reshape(-1), rewards)


def online_dpo_loss(model, batch: RolloutBatch, *, config: OnlineDPOConfig) -> LossOutput:
    """The preference loss on the micro-batch's pairs, as a SUM over pairs (the shared step divides by the update's
    pairs: TRL's mean). Rows come in pairs, in order; `advantages` says which member won."""
    logps = completion_logprobs(model, batch)
    policy = (logps * batch.mask).sum(-1).view(-1, 2)
    reference = (batch.data["ref_logps"] * batch.mask).sum(-1).view(-1, 2)
    lengths = batch.mask.sum(-1).view(-1, 2)
    first_wins = batch.data["advantages"].view(-1, 2)[:, 0] > 0
    won, lost = (~first_wins).long(), first_wins.long()  # the winner's column: 0 where the first answer won
    rows = torch.arange(policy.shape[0], device=policy.device)
    parts = PreferenceLogps(policy[rows, won], policy[rows, lost], lengths[rows, won], lengths[rows, lost],
                            reference[rows, won], reference[rows, lost])
    loss, metrics = get_preference_loss(config.loss)(parts, beta=config.beta)
    pairs = policy.shape[0]
    return LossOutput(loss * pairs, pairs, metric_sums(metrics, pairs))


def pair_units(config: OnlineDPOConfig, batch: RolloutBatch, max_new_tokens: int) -> int:
    """Online DPO's loss averages over pairs."""
    return len(batch.rows) // 2


ONLINE_DPO = PolicyGradientMethod("online_dpo", OnlineDPOConfig, pair_advantages, online_dpo_loss,
                                  kl_in_reward=False, sequence_units=True, needs_reference=True, together=2,
                                  drop_ties=True, units=pair_units)


def online_dpo(task, config: OnlineDPOConfig | None = None, *, out: str | Path | None = None, resume: bool = False,
               force: bool = False) -> Artifact:
    """Train the task's model with online DPO on its reward or judge; return the Artifact."""
    return train_policy_gradient(task, ONLINE_DPO, config or OnlineDPOConfig(), out=out, resume=resume, force=force)


register_method(Method("online_dpo", "reward", OnlineDPOConfig, online_dpo, "online DPO: the policy's own answer "
                       "pairs, ranked by a judge, reward model or reward functions, trained with DPO",
                       "https://arxiv.org/abs/2402.04792", needs=ONLINE_NEEDS))
