"""Losses of reward-based customization: pure functions, tensors in, `(loss, metrics)` out.

Three families, each checked against TRL 1.16 on the same inputs (tests/unit/test_reward_losses.py):

- reward model: `bradley_terry_loss`;
- offline preference (DPO family) on per-sequence log-probs: `dpo_loss`, `ipo_loss`, `cdpo_loss`, `kto_loss`,
  `orpo_loss`, `simpo_loss`, registered by name in `PREFERENCE_LOSSES`;
- online RL: `grpo_advantages`, `rloo_advantages`, `kl_k1`, `kl_k3`, `policy_gradient_loss` (GRPO/DAPO), the GRPO
  loss family behind one name (`policy_loss`: grpo, dr_grpo, dapo, bnpo, gspo, cispo, registered in `POLICY_LOSSES`),
  DAPO's `zero_variance_groups` and `overlong_penalty`, and the PPO pieces `kl_penalised_rewards`, `gae`, `masked_whiten`, `ppo_policy_loss`, `ppo_value_loss`.

Conventions. Shapes: `B` sequences, `T` completion positions. Log-probs of a sequence are *summed* over its
completion tokens (never the prompt); `lengths` count those tokens. A `mask` is 1 on completion tokens and 0 on
padding. Metrics are detached 0-dim tensors (call `.item()` when logging), named as TRL names them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from honellm.errors import HoneError

Metrics = dict[str, Tensor]


def _mean(x: Tensor) -> Tensor:
    """Mean of a detached tensor; NaN for an empty one (TRL logs nothing then; we keep the key)."""
    return x.detach().float().mean() if x.numel() else torch.tensor(float("nan"))


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Metrics:
    """The implicit-reward metrics TRL logs for paired preference losses (means over the batch)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).float()),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
    }


# ---------------------------------------------------------------------------------------------------------------
# Reward model


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    center_coefficient: float | None = None,
) -> tuple[Tensor, Metrics]:
    """Pairwise Bradley-Terry loss of a reward model: `-log sigmoid(r_chosen - r_rejected - margin)`.

    Paper: InstructGPT, https://arxiv.org/abs/2203.02155 (Eq. 1); the margin is Llama 2's
    (https://arxiv.org/abs/2307.09288, Eq. 2); `center_coefficient` adds `c * mean((r_c + r_r)^2)` to keep rewards
    centred at zero (https://arxiv.org/abs/2312.09244), as TRL's `RewardConfig.center_rewards_coefficient` does.

    Shapes: `chosen_rewards`, `rejected_rewards`, `margin`: (B,) scalar scores. Same as TRL `RewardTrainer`.
    Metrics: `accuracy` (chosen scored higher), `margin` (mean r_c - r_r), `mean_reward` (over both).
    """
    delta = chosen_rewards - rejected_rewards
    logits = delta if margin is None else delta - margin
    loss = -F.logsigmoid(logits).mean()
    if center_coefficient is not None:
        loss = loss + center_coefficient * torch.mean((chosen_rewards + rejected_rewards) ** 2)
    delta = delta.detach()
    metrics = {
        "accuracy": (delta > 0).float().mean(),
        "margin": delta.mean(),
        "mean_reward": torch.cat([chosen_rewards.detach(), rejected_rewards.detach()]).mean(),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# Offline preference losses. Inputs: summed completion log-probs, (B,) each, of the policy and the frozen reference.


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Metrics]:
    """DPO, sigmoid form: `-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`, mean over pairs.

    Paper: https://arxiv.org/abs/2305.18290 (Eq. 7). Same as TRL `DPOTrainer` with `loss_type="sigmoid"`.
    Shapes: all four log-prob tensors (B,), summed over completion tokens. Implicit rewards `beta * (pi - ref)`.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return loss, preference_metrics(beta * chosen_logratios, beta * rejected_logratios)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> tuple[Tensor, Metrics]:
    """IPO: squared regression of the log-ratio gap onto `1 / (2 beta)` (beta is the paper's tau).

    Paper: https://arxiv.org/abs/2310.12036 (Eq. 17). Departure from the paper, as in TRL `DPOTrainer`
    (`loss_type="ipo"`): each log-ratio is divided by its completion length (tokens, clamped at 1), so the squared
    loss does not grow with length; TRL says the IPO authors confirmed this is the form behind their results.
    Shapes: log-probs (B,) summed over tokens; `chosen_lengths`, `rejected_lengths` (B,) completion token counts.
    Metrics are TRL's: rewards are `beta` times the *summed* (not length-normalised) log-ratios.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios / chosen_lengths.clamp(min=1.0) - rejected_logratios / rejected_lengths.clamp(
        min=1.0
    )
    loss = ((delta - 1 / (2 * beta)) ** 2).mean()
    return loss, preference_metrics(beta * chosen_logratios, beta * rejected_logratios)


def cdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> tuple[Tensor, Metrics]:
    """Conservative DPO: DPO with labels flipped with probability `label_smoothing` (eps).

    `-(1 - eps) log sigmoid(beta * d) - eps log sigmoid(-beta * d)`, `d` the DPO log-ratio gap. From
    https://ericmitchell.ai/cdpo.pdf. TRL 1.16's `DPOTrainer` no longer applies `label_smoothing` to `"sigmoid"`
    (only to `"robust"`, `"exo_pair"` and `"aot"`); this is the formula of TRL's CPO trainer (`"sigmoid"`) and of
    earlier `DPOTrainer` releases, applied to reference-adjusted log-ratios. `eps = 0` gives `dpo_loss`.
    Shapes: as `dpo_loss`.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses.mean(), preference_metrics(beta * chosen_logratios, beta * rejected_logratios)


def kto_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    policy_kl_logps: Tensor | None = None,
    ref_kl_logps: Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """KTO on unpaired data: desirable ("chosen") and undesirable ("rejected") completions, any counts.

    Paper: https://arxiv.org/abs/2402.01306 (Eq. 7). Desirable: `1 - sigmoid(beta * (logratio - z))`,
    undesirable: `1 - sigmoid(beta * (z - logratio))`, weighted, mean over all completions. The reference point `z`
    is estimated as TRL `KTOTrainer` does: the batch mean of `policy_kl_logps - ref_kl_logps` over *mismatched*
    (prompt, completion) pairs (TRL rotates completions by one within the batch), detached, clamped at 0. Without
    KL log-probs `z = 0`. (TRL also all-gathers `z` across processes; a recipe under DDP should do the same.)

    Shapes: `policy_chosen_logps`, `ref_chosen_logps` (Bc,); `policy_rejected_logps`, `ref_rejected_logps` (Br,);
    `policy_kl_logps`, `ref_kl_logps` (Bkl,), summed over completion tokens; Bc or Br may be 0.
    Metrics as TRL's: rewards/chosen, rewards/rejected, rewards/margins, kl (TRL logs no accuracy for KTO).
    """
    if policy_kl_logps is not None and ref_kl_logps is not None:
        kl = (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    else:
        kl = torch.zeros((), device=policy_chosen_logps.device)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    loss = torch.cat([desirable_weight * chosen_losses, undesirable_weight * rejected_losses]).nanmean()
    chosen_rewards, rejected_rewards = _mean(beta * chosen_logratios), _mean(beta * rejected_logratios)
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "kl": kl.float(),
    }
    return loss, metrics


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> tuple[Tensor, Metrics]:
    """ORPO, reference-free: SFT loss on the chosen completions minus `beta * log sigmoid(log odds ratio)`.

    Paper: https://arxiv.org/abs/2403.07691 (Eqs. 4-7; `beta` is the paper's lambda). The odds use the *mean*
    per-token log-prob `m = logps / lengths`: `log odds = (m_c - m_r) - (log(1 - e^m_c) - log(1 - e^m_r))`,
    computed in fp32 with a stable `log(1 - e^x)` as TRL `ORPOTrainer.odds_ratio_loss` does.
    Departure from TRL: the NLL term here is over completion tokens only (`-sum(logps_c) / sum(lengths_c)`, token
    weighted over the batch), as in the paper; TRL's `ORPOTrainer` takes cross-entropy over prompt *and*
    completion tokens of the chosen sequences.
    Shapes: log-probs (B,) summed over completion tokens; lengths (B,) completion token counts.
    Metrics: TRL's rewards (`beta` times the mean log-probs), nll_loss, log_odds_ratio, log_odds_chosen.
    """
    chosen = policy_chosen_logps.float() / chosen_lengths.clamp(min=1)
    rejected = policy_rejected_logps.float() / rejected_lengths.clamp(min=1)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = -policy_chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)
    loss = nll - beta * ratio.mean()
    metrics = preference_metrics(beta * chosen, beta * rejected)
    metrics |= {"nll_loss": nll.detach(), "log_odds_ratio": _mean(ratio), "log_odds_chosen": _mean(log_odds)}
    return loss, metrics


def _log1mexp(x: Tensor) -> Tensor:
    """`log(1 - exp(x))` for x < 0 without cancellation (branch at -ln 2; Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> tuple[Tensor, Metrics]:
    """SimPO, reference-free: `-log sigmoid(beta * (m_c - m_r) - gamma)`, `m` the mean per-token log-prob.

    Paper: https://arxiv.org/abs/2405.14734 (Eq. 6). Same formula as TRL's `CPOTrainer` with
    `loss_type="simpo"`, `cpo_alpha=0` (TRL's default `cpo_alpha=1.0` adds a behaviour-cloning NLL term, which is
    CPO-SimPO, not SimPO). Defaults follow the paper's ranges (beta 2.0-2.5, gamma/beta about 0.5); TRL's defaults
    are beta 0.1, gamma 0.5.
    Shapes: log-probs (B,) summed over completion tokens; lengths (B,) completion token counts.
    Metrics: TRL's rewards, `beta` times the mean log-probs.
    """
    chosen = policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected = policy_rejected_logps / rejected_lengths.clamp(min=1)
    loss = -F.logsigmoid(beta * (chosen - rejected) - gamma).mean()
    return loss, preference_metrics(beta * chosen, beta * rejected)


# ---------------------------------------------------------------------------------------------------------------
# The registry of offline preference losses: what the recipes and the CLI look names up in.


@dataclass(frozen=True)
class PreferenceLogps:
    """What a preference recipe measures for a batch; each loss takes the parts it needs.

    Log-probs are summed over completion tokens; lengths count completion tokens. For paired losses the chosen and
    rejected tensors are (B,) and aligned; for KTO they are the desirable (Bc,) and undesirable (Br,) completions,
    and `kl`/`ref_kl` are the log-probs of mismatched (prompt, completion) pairs.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    kl: Tensor | None = None
    ref_kl: Tensor | None = None


@dataclass(frozen=True)
class PreferenceLoss:
    """A registered preference loss and what it needs from the recipe.

    `needs_reference`: takes the reference model's log-probs (the recipe keeps a frozen copy or disables the
    adapter). `needs_lengths`: takes completion lengths (length-normalised losses). `paired`: (chosen, rejected)
    pairs; False for KTO, which takes desirable and undesirable completions and mismatched pairs for its KL term.
    """

    name: str
    fn: Callable[..., tuple[Tensor, Metrics]]
    needs_reference: bool = True
    needs_lengths: bool = False
    paired: bool = True

    def __call__(self, logps: PreferenceLogps, **hparams: float) -> tuple[Tensor, Metrics]:
        """Call `fn` with the parts of `logps` it takes; `hparams` are its keyword arguments (`beta`, ...)."""
        args: list[Tensor] = [logps.chosen, logps.rejected]
        if self.needs_reference:
            if logps.ref_chosen is None or logps.ref_rejected is None:
                raise ValueError(
                    f"the {self.name!r} loss needs reference log-probs (ref_chosen, ref_rejected)"
                )
            args += [logps.ref_chosen, logps.ref_rejected]
        kwargs: dict = dict(hparams)
        if self.needs_lengths:
            kwargs |= {"chosen_lengths": logps.chosen_lengths, "rejected_lengths": logps.rejected_lengths}
        if not self.paired:
            kwargs |= {"policy_kl_logps": logps.kl, "ref_kl_logps": logps.ref_kl}
        return self.fn(*args, **kwargs)


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}


def register_preference_loss(name: str, fn: Callable[..., tuple[Tensor, Metrics]], **needs: bool) -> None:
    """Register `fn` under `name`; a name is registered once (a second registration is a bug, not an override)."""
    if name in PREFERENCE_LOSSES:
        raise ValueError(f"preference loss {name!r} is already registered")
    PREFERENCE_LOSSES[name] = PreferenceLoss(name, fn, **needs)


def get_preference_loss(name: str) -> PreferenceLoss:
    """The registered loss called `name`, or a `HoneError` that suggests the closest name."""
    if name not in PREFERENCE_LOSSES:
        close = difflib.get_close_matches(name, PREFERENCE_LOSSES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise HoneError(
            f"unknown preference loss {name!r}",
            fix=f"{hint}choose one of: {', '.join(sorted(PREFERENCE_LOSSES))}",
        )
    return PREFERENCE_LOSSES[name]


register_preference_loss("dpo", dpo_loss)
register_preference_loss("ipo", ipo_loss, needs_lengths=True)
register_preference_loss("cdpo", cdpo_loss)
register_preference_loss("kto", kto_loss, paired=False)
register_preference_loss("orpo", orpo_loss, needs_reference=False, needs_lengths=True)
register_preference_loss("simpo", simpo_loss, needs_reference=False, needs_lengths=True)


# ---------------------------------------------------------------------------------------------------------------
# Online RL: advantages from rewards of a group of completions per prompt.


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """(N,) rewards, consecutive groups of `group_size` completions of one prompt, as (N / group_size, group_size)."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def _nanstd(x: Tensor, dim: int) -> Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (NaN where fewer than two values), as TRL's `nanstd`."""
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nanmean((x - torch.nanmean(x, dim=dim, keepdim=True)) ** 2, dim=dim, keepdim=True)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    return var.sqrt().squeeze(dim)


def grpo_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """Group-normalised advantages: `(r - mean_group) / (std_group + eps)`, or `r - mean_group` if not `scale`.

    Paper: DeepSeekMath, https://arxiv.org/abs/2402.03300 (Sec. 4.1.2); `scale=False` is Dr. GRPO's unbiased
    form (https://arxiv.org/abs/2503.20783). Same as TRL `GRPOTrainer` (`scale_rewards="group"` / `"none"`): the std
    is Bessel-corrected, `eps = 1e-4`, NaN rewards (unscorable completions) are left out of the group statistics
    and get advantage 0.
    Shapes: `rewards` (N,), N = prompts x group_size, the completions of one prompt consecutive. Returns (N,).
    """
    grouped = _grouped(rewards, group_size)
    advantages = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale:
        std = _nanstd(grouped, dim=1) if group_size > 1 else torch.zeros_like(grouped[:, 0])
        advantages = advantages / (std.unsqueeze(1) + eps)
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out: `r_i - mean(r_j, j != i)` within each prompt's group.

    Paper: https://arxiv.org/abs/2402.14740 (Eq. 6). Same as TRL `RLOOTrainer` before its optional batch
    whitening (`normalize_advantages`, off by default): NaN rewards are left out of the baseline and get 0.
    Shapes: `rewards` (N,) grouped as in `grpo_advantages`; `group_size >= 2`. Returns (N,).
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least two completions per prompt (group_size >= 2)")
    grouped = _grouped(rewards, group_size)
    count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baseline = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (count - 1)
    return torch.nan_to_num((grouped - baseline).reshape(-1), nan=0.0)


def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL(policy || ref) estimate `log pi - log ref` (unbiased, can be negative). Same shape as inputs.

    Schulman, http://joschu.net/blog/kl-approx.html. TRL's PPO default (`kl_estimator="k1"`) and RLOO's penalty.
    """
    return logps - ref_logps


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL(policy || ref) estimate `exp(ref - pi) - (ref - pi) - 1` (unbiased, always >= 0).

    Schulman, http://joschu.net/blog/kl-approx.html; the GRPO paper's KL term (Eq. 4), as TRL `GRPOTrainer`.
    Shapes: (B, T) per-token log-probs of the sampled tokens; returns (B, T).
    """
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1


# Aggregation of a (B, T) per-token loss: the choice is the whole difference between GRPO-the-paper and DAPO/TRL.


def token_mean(per_token: Tensor, mask: Tensor, num_tokens: float | Tensor | None = None) -> Tensor:
    """Sum over all completion tokens divided by their count (DAPO, https://arxiv.org/abs/2503.14476, Eq. 8).

    TRL's default (`loss_type="dapo"`). Every token weighs the same, so long completions are not diluted. With
    gradient accumulation pass `num_tokens`, the token count of the whole accumulated batch, as TRL does with
    `num_items_in_batch`; otherwise the count of this batch is used.
    """
    denominator = mask.sum().clamp(min=1.0) if num_tokens is None else num_tokens
    return (per_token * mask).sum() / denominator


def sequence_mean(per_token: Tensor, mask: Tensor, num_tokens: float | Tensor | None = None) -> Tensor:
    """Mean over tokens within each sequence, then over sequences (the GRPO paper, Eq. 3; TRL `"grpo"`).

    `num_tokens` is accepted for a common signature and ignored.
    """
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


NORMALISATIONS: dict[str, Callable[..., Tensor]] = {"token": token_mean, "sequence": sequence_mean}


def with_kl_term(per_token: Tensor, logps: Tensor, ref_logps: Tensor | None, mask: Tensor, kl_coef: float,
                 metrics: Metrics) -> Tensor:
    """`per_token` plus `kl_coef` x the k3 KL to the reference per token (GRPO's, before aggregation, as TRL);
    the KL's token mean goes into `metrics["kl"]` whenever `ref_logps` is given."""
    if ref_logps is None:
        if kl_coef:
            raise ValueError("kl_coef > 0 needs ref_logps")
        return per_token
    per_token_kl = kl_k3(logps, ref_logps)
    metrics["kl"] = token_mean(per_token_kl.detach(), mask)
    return per_token + kl_coef * per_token_kl if kl_coef else per_token


def policy_gradient_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    ref_logps: Tensor | None = None,
    normalisation: str = "token",
    num_tokens: float | Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """GRPO's clipped surrogate, per token, plus `kl_coef` times the k3 KL to the reference, per token.

    Paper: https://arxiv.org/abs/2402.03300 (Eq. 3). Per token: `-min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A)`
    with `rho = exp(logps - old_logps)`; `clip_eps_high` (DAPO's clip-higher) defaults to `clip_eps`.
    Normalisation: `"token"` (default) divides the sum over all completion tokens by their number, as DAPO and TRL's
    default `loss_type="dapo"`; `"sequence"` averages within each sequence first, as the GRPO paper and TRL's
    `loss_type="grpo"`. TRL's default `beta` (our `kl_coef`) is 0.0.
    Shapes: `logps`, `old_logps`, `ref_logps`, `mask` (B, T); `advantages` (B,) or (B, T).
    Metrics: kl (token mean of k3, when `ref_logps` is given), clip_ratio/low_mean, /high_mean, /region_mean.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    metrics: Metrics = {}
    per_token = with_kl_term(per_token, logps, ref_logps, mask, kl_coef, metrics)
    loss = NORMALISATIONS[normalisation](per_token, mask, num_tokens)
    with torch.no_grad():
        low = (ratio < 1 - clip_eps) & (advantages < 0)
        high = (ratio > 1 + clip_eps_high) & (advantages > 0)
        metrics["clip_ratio/low_mean"] = token_mean(low.float(), mask)
        metrics["clip_ratio/high_mean"] = token_mean(high.float(), mask)
        metrics["clip_ratio/region_mean"] = token_mean((low | high).float(), mask)
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# The GRPO loss family: one setting (`loss=`) of the GRPO recipe, each member a small function of the same inputs.
#
# Every member takes per-token log-probs of the sampled completion tokens under the policy (`logps`, with grad), the
# sampler's (`old_logps`), the advantages, the completion mask, and returns `(per_token, aggregate)`: the loss of each
# token before aggregation (B, T) and the function that reduces it. `policy_loss` adds the KL term and the entropy
# bonus the same way for all of them, so a member differs from another only where its paper does.


@dataclass(frozen=True)
class PolicyLossSettings:
    """What the members read beyond the tensors (TRL `GRPOConfig` names in brackets).

    `clip_eps` [epsilon], `clip_eps_high` [epsilon_high; None: the member's default], `max_length`
    [max_completion_length] for Dr. GRPO's constant normaliser, `num_tokens` [num_items_in_batch], the completion
    tokens of the whole accumulated update for the token-mean members (None: this batch's).
    """

    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    max_length: int | None = None
    num_tokens: float | Tensor | None = None


def token_log_weights(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    """Per-token log importance weights `log pi - log pi_old`, (B, T)."""
    return logps - old_logps


def sequence_log_weights(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    """GSPO's sequence-level log weight: the length-normalised sum of token log-ratios, (B, 1) (broadcasts to tokens).

    Zheng et al., https://arxiv.org/abs/2507.18071 (Eq. 7); TRL `importance_sampling_level="sequence"`.
    """
    return ((logps - old_logps) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)


def clipped_surrogate(log_weights: Tensor, advantages: Tensor, low: float, high: float) -> Tensor:
    """PPO's pessimistic surrogate per token: `-min(w A, clip(w, 1 - low, 1 + high) A)`."""
    weights = torch.exp(log_weights)
    return -torch.min(weights * advantages, torch.clamp(weights, 1 - low, 1 + high) * advantages)


def _clip_metrics(log_weights: Tensor, advantages: Tensor, mask: Tensor, low: float, high: float) -> Metrics:
    """Shares of clipped tokens (of clipped sequences, for sequence-level weights), as TRL reports them."""
    with torch.no_grad():
        weights = torch.exp(log_weights)
        if weights.shape[-1] == 1:  # one weight per sequence: each sequence with a completion token counts once
            mask = (mask.sum(-1, keepdim=True) > 0).to(mask.dtype)
        below = (weights < 1 - low) & (advantages < 0)
        above = (weights > 1 + high) & (advantages > 0)
        return {"clip_ratio/low_mean": token_mean(below.float(), mask),
                "clip_ratio/high_mean": token_mean(above.float(), mask),
                "clip_ratio/region_mean": token_mean((below | above).float(), mask)}


def constant_length_mean(per_token: Tensor, mask: Tensor, max_length: int | None) -> Tensor:
    """Dr. GRPO's normaliser: the sum over completion tokens divided by `B x max_length`, a constant, so neither a
    long nor a short completion changes the weight of another's tokens (https://arxiv.org/abs/2503.20783, Sec. 3.1)."""
    if not max_length:
        raise ValueError("dr_grpo needs max_length (the longest completion the sampler may produce)")
    return (per_token * mask).sum() / (per_token.size(0) * max_length)


PolicyLossFn = Callable[[Tensor, Tensor, Tensor, Tensor, PolicyLossSettings], tuple[Tensor, Tensor, Metrics]]


def grpo_policy_loss(logps, old_logps, advantages, mask, s: PolicyLossSettings):
    """GRPO (https://arxiv.org/abs/2402.03300, Eq. 3): token-level clipped ratio, mean per sequence, then over
    sequences. TRL `loss_type="grpo"`. Returns (per-token loss, reduced loss without KL/entropy, metrics)."""
    high = s.clip_eps if s.clip_eps_high is None else s.clip_eps_high
    w = token_log_weights(logps, old_logps, mask)
    per_token = clipped_surrogate(w, advantages, s.clip_eps, high)
    return per_token, lambda t: sequence_mean(t, mask), _clip_metrics(w, advantages, mask, s.clip_eps, high)


def bnpo_policy_loss(logps, old_logps, advantages, mask, s: PolicyLossSettings):
    """BNPO (https://arxiv.org/abs/2506.02864): the clipped ratio averaged over this batch's tokens (TRL
    `loss_type="bnpo"`: the local micro-batch's token count, not the accumulated update's)."""
    high = s.clip_eps if s.clip_eps_high is None else s.clip_eps_high
    w = token_log_weights(logps, old_logps, mask)
    per_token = clipped_surrogate(w, advantages, s.clip_eps, high)
    return per_token, lambda t: token_mean(t, mask), _clip_metrics(w, advantages, mask, s.clip_eps, high)


def dr_grpo_policy_loss(logps, old_logps, advantages, mask, s: PolicyLossSettings):
    """Dr. GRPO (https://arxiv.org/abs/2503.20783): the clipped ratio summed and divided by a constant
    (`B x max_length`); pair it with unscaled advantages (no std normalisation). TRL `loss_type="dr_grpo"`."""
    high = s.clip_eps if s.clip_eps_high is None else s.clip_eps_high
    w = token_log_weights(logps, old_logps, mask)
    per_token = clipped_surrogate(w, advantages, s.clip_eps, high)
    return (per_token, lambda t: constant_length_mean(t, mask, s.max_length),
            _clip_metrics(w, advantages, mask, s.clip_eps, high))


def dapo_policy_loss(logps, old_logps, advantages, mask, s: PolicyLossSettings):
    """DAPO (https://arxiv.org/abs/2503.14476): clip-higher (`clip_eps_high` > `clip_eps`, 0.28 by default) and the
    token-level mean over the whole update (`num_tokens`). TRL `loss_type="dapo"`. Its dynamic sampling and
    overlong shaping act on rollouts and rewards, not on this function (see `zero_variance_groups`,
    `overlong_penalty`)."""
    high = 0.28 if s.clip_eps_high is None else s.clip_eps_high
    w = token_log_weights(logps, old_logps, mask)
    per_token = clipped_surrogate(w, advantages, s.clip_eps, high)
    return (per_token, lambda t: token_mean(t, mask, s.num_tokens),
            _clip_metrics(w, advantages, mask, s.clip_eps, high))


def gspo_policy_loss(logps, old_logps, advantages, mask, s: PolicyLossSettings):
    """GSPO (https://arxiv.org/abs/2507.18071): one importance ratio per sequence (the geometric mean of its token
    ratios), clipped, then GRPO's per-sequence mean. TRL `loss_type="grpo", importance_sampling_level="sequence"`.
    The paper clips at 3e-4 / 4e-4: sequence ratios are close to 1."""
    high = s.clip_eps if s.clip_eps_high is None else s.clip_eps_high
    w = sequence_log_weights(logps, old_logps, mask)
    per_token = clipped_surrogate(w, advantages, s.clip_eps, high).expand_as(logps)
    return per_token, lambda t: sequence_mean(t, mask), _clip_metrics(w, advantages, mask, s.clip_eps, high)


def cispo_policy_loss(logps, old_logps, advantages, mask, s: PolicyLossSettings):
    """CISPO (MiniMax-M1, https://arxiv.org/abs/2506.13585): REINFORCE on every token with its importance weight
    clipped from above and detached, `-min(w, eps_high).sg * A * log pi`, so no token's gradient is dropped; token
    mean over the update. TRL `loss_type="cispo"` (its `epsilon_high` is the cap; 5.0 by default here, as TRL's
    documentation suggests)."""
    high = 5.0 if s.clip_eps_high is None else s.clip_eps_high
    w = token_log_weights(logps, old_logps, mask)
    capped = torch.clamp(torch.exp(w), max=high).detach()
    per_token = -capped * advantages * logps
    with torch.no_grad():
        metrics = {"clip_ratio/region_mean": token_mean(((torch.exp(w) > high) & (advantages > 0)).float(), mask)}
    return per_token, lambda t: token_mean(t, mask, s.num_tokens), metrics


@dataclass(frozen=True)
class PolicyLoss:
    """A member of the GRPO family: its function, whether its advantages are divided by the group std by default
    (Dr. GRPO: not), and the paper."""

    name: str
    fn: PolicyLossFn
    scale_rewards: bool
    paper: str
    trl: str  # the TRL GRPOConfig settings that give the same value


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(loss: PolicyLoss) -> None:
    """Add a member to `POLICY_LOSSES` (names are unique)."""
    if loss.name in POLICY_LOSSES:
        raise ValueError(f"policy loss {loss.name!r} is registered twice")
    POLICY_LOSSES[loss.name] = loss


for _loss in (
    PolicyLoss("grpo", grpo_policy_loss, True, "https://arxiv.org/abs/2402.03300", 'loss_type="grpo"'),
    PolicyLoss("dr_grpo", dr_grpo_policy_loss, False, "https://arxiv.org/abs/2503.20783", 'loss_type="dr_grpo"'),
    PolicyLoss("dapo", dapo_policy_loss, True, "https://arxiv.org/abs/2503.14476", 'loss_type="dapo"'),
    PolicyLoss("bnpo", bnpo_policy_loss, True, "https://arxiv.org/abs/2506.02864", 'loss_type="bnpo"'),
    PolicyLoss("gspo", gspo_policy_loss, True, "https://arxiv.org/abs/2507.18071",
               'loss_type="grpo", importance_sampling_level="sequence"'),
    PolicyLoss("cispo", cispo_policy_loss, True, "https://arxiv.org/abs/2506.13585", 'loss_type="cispo"'),
):
    register_policy_loss(_loss)


def get_policy_loss(name: str) -> PolicyLoss:
    """The registered member called `name`; a clear error with the closest names otherwise."""
    if name not in POLICY_LOSSES:
        close = difflib.get_close_matches(name, list(POLICY_LOSSES), n=2)
        raise HoneError(f"unknown policy loss {name!r}", fix=f"use one of {', '.join(sorted(POLICY_LOSSES))}"
                        + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return POLICY_LOSSES[name]


def policy_loss(
    name: str,
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    settings: PolicyLossSettings = PolicyLossSettings(),  # noqa: B008 - frozen
    *,
    kl_coef: float = 0.0,
    ref_logps: Tensor | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    sampler_weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """The member `name`'s loss, plus `kl_coef` x the k3 KL to the reference per token (before aggregation, as
    TRL), minus `entropy_coef` x the token-mean entropy (an exploration bonus; TRL's `entropy_coef`).
    `sampler_weights` (`sampler_importance_weights`: (B, T) or (B, 1)) multiply the member's per-token loss
    before the KL term is added (TRL's vLLM importance sampling correction).

    Shapes: `logps`, `old_logps`, `ref_logps`, `entropy`, `mask` (B, T); `advantages` (B,) or (B, T).
    Metrics: clip_ratio/* (the member's), kl (k3 token mean, when `ref_logps` is given), entropy (token mean, when
    `entropy` is given), policy_loss (the member's term alone).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    mask = mask.to(logps.dtype)
    per_token, reduce, metrics = get_policy_loss(name).fn(logps, old_logps, advantages, mask, settings)
    metrics = dict(metrics)
    if sampler_weights is not None:  # vLLM's sampler against the trainer: truncated importance sampling
        per_token = per_token * sampler_weights
        metrics["sampler_is_ratio"] = token_mean(sampler_weights.expand_as(mask), mask)
    per_token = with_kl_term(per_token, logps, ref_logps, mask, kl_coef, metrics)
    loss = reduce(per_token)
    if entropy is not None:
        mean_entropy = token_mean(entropy, mask)
        metrics["entropy"] = mean_entropy.detach()
        if entropy_coef:
            loss = loss - entropy_coef * mean_entropy
    elif entropy_coef:
        raise ValueError("entropy_coef > 0 needs the per-token entropy")
    return loss, metrics


SAMPLER_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_importance_weights(trainer_logps: Tensor, sampler_logps: Tensor, mask: Tensor, *,
                               mode: str = "token_truncate", clip_max: float | None = 3.0,
                               clip_min: float | None = None) -> Tensor:
    """Importance weights correcting the mismatch between the sampler's log-probs (vLLM's kernels, another
    precision) and the trainer's for the same tokens: the rollouts were drawn from the sampler, the loss assumes
    the trainer's policy. TRL's `vllm_importance_sampling_correction` (Yao et al., "Your efficient RL framework
    secretly brings you off-policy RL training", truncated importance sampling):

        ratio = exp(trainer_old_logp - sampler_logp)     per token (token_*) or summed per sequence (sequence_*)
        *_truncate: clamp(ratio, clip_min, clip_max);   *_mask: ratio, or 0 where outside [clip_min, clip_max]

    and the caller multiplies the per-token loss by it (before the KL term, as TRL). `trainer_logps` are the
    trainer's log-probs before the update (no gradient), `sampler_logps` the sampler's, both (B, T); positions
    outside `mask` and NaN sampler log-probs (unavailable) contribute a zero difference. Returns (B, T) for token
    modes, (B, 1) for sequence modes, detached."""
    if mode not in SAMPLER_IS_MODES:
        raise ValueError(f"unknown importance sampling mode {mode!r}; one of {', '.join(SAMPLER_IS_MODES)}")
    with torch.no_grad():
        diff = torch.nan_to_num((trainer_logps - sampler_logps) * mask.to(trainer_logps.dtype), nan=0.0)
        if mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        ratio = torch.exp(diff)
        if mode.endswith("truncate"):
            return torch.clamp(ratio, min=clip_min, max=clip_max)
        low = -math.inf if clip_min is None else clip_min
        high = math.inf if clip_max is None else clip_max
        return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO's dynamic sampling, as a filter: True for each completion (N,) whose group's rewards are all equal (or
    all NaN). Such groups have zero advantage everywhere and only dilute the update (DAPO Eq. 11 resamples until the
    batch is full of informative groups; dropping them is the budget-neutral form)."""
    grouped = _grouped(rewards, group_size)
    finite = torch.nan_to_num(grouped, nan=float("inf"))
    same = (finite == finite[:, :1]).all(dim=1) | torch.isnan(grouped).all(dim=1)
    return same.repeat_interleave(group_size)


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (https://arxiv.org/abs/2503.14476, Eq. 13): 0 up to `max_length - buffer`
    tokens, then falling linearly to `-penalty` at `max_length` (and below it beyond). Shapes: (N,) -> (N,)."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    start = max_length - buffer
    return -penalty * ((lengths.float() - start).clamp(min=0.0) / buffer)


# ---------------------------------------------------------------------------------------------------------------
# PPO (classic RLHF: a reward model's score at the end, a per-token KL penalty, a value head, GAE).


def kl_penalised_rewards(
    scores: Tensor,
    logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    kl_coef: float = 0.05,
    kl: Callable[[Tensor, Tensor], Tensor] = kl_k1,
) -> Tensor:
    """Per-token rewards: `-kl_coef * KL_t` on every completion token, plus the score on the last one.

    Ziegler et al., https://arxiv.org/abs/1909.08593 (Eq. 2); InstructGPT. `kl` is the estimator (`kl_k1`, TRL's
    PPO default, or `kl_k3`). Departure from TRL's PPO trainer (trl/experimental/ppo/ppo_trainer.py, "4. compute
    rewards"): TRL adds the score one position *past* the last token when the row has room (its values are kept
    there too, via `padding_mask_p1`); here it goes on the last completion token, where the episode ends.
    Shapes: `scores` (B,); `logps`, `ref_logps`, `mask` (B, T), mask contiguous from the start. Returns (B, T),
    zero on padding. Rows with an empty mask get no score.
    """
    rewards = -kl_coef * kl(logps, ref_logps) * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    has_tokens = mask.sum(-1) > 0
    rows = torch.arange(rewards.size(0), device=rewards.device)
    return rewards.index_put((rows, last), (scores * has_tokens).to(rewards.dtype), accumulate=True)


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation; returns `(advantages, returns)` with `returns = advantages + values`.

    Paper: https://arxiv.org/abs/1506.02438 (Eq. 16). `delta_t = r_t + gamma V_{t+1} - V_t`,
    `A_t = delta_t + gamma lam A_{t+1}`; the episode ends at the last completion token (V after it is 0). The
    recursion is TRL's PPO trainer's ("6. compute advantages and returns"; defaults gamma 1, lam 0.95) on rewards
    and values zeroed on padding. Whitening (TRL whitens advantages) is left to the caller: `masked_whiten`.
    Shapes: `rewards`, `values`, `mask` (B, T); returns two (B, T), zero on padding.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise to mean 0 and variance 1 over the masked entries (Bessel-corrected variance, eps 1e-8).

    As TRL's PPO `masked_whiten`; with `shift_mean=False` the mean is added back (TRL's reward whitening).
    Shapes: any, `mask` the same shape, at least two entries set. Padding entries are shifted too; re-mask them.
    """
    count = mask.sum()
    mean = (values * mask).sum() / count
    var = (((values - mean) ** 2) * mask).sum() / count * (count / (count - 1))
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def ppo_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
) -> tuple[Tensor, Metrics]:
    """PPO's clipped surrogate, per token, token mean: `max(-A rho, -A clip(rho, 1 - eps, 1 + eps))`.

    Paper: https://arxiv.org/abs/1707.06347 (Eq. 7). As TRL's PPO trainer (`cliprange` 0.2, `masked_mean`).
    Shapes: all (B, T). Metrics: clipfrac (share of tokens where clipping bound), approxkl (`0.5 mean(d^2)` over
    masked tokens; TRL averages over all positions).
    """
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = token_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clipfrac": token_mean((clipped > unclipped).float(), mask),
            "approxkl": 0.5 * token_mean(log_ratio**2, mask),
        }
    return loss, metrics


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
) -> tuple[Tensor, Metrics]:
    """Clipped value loss `0.5 * mean(max((V - R)^2, (clip(V, V_old +- eps) - R)^2))` over completion tokens.

    From the PPO implementations (OpenAI baselines; https://arxiv.org/abs/2005.12729 discusses it). As TRL's PPO
    trainer (`cliprange_value` 0.2), whose mask also keeps one position past the end (see `kl_penalised_rewards`).
    Shapes: all (B, T). Metrics: vf_clipfrac.
    """
    clipped_values = torch.clamp(values, old_values - clip_eps, old_values + clip_eps)
    losses = (values - returns) ** 2
    clipped_losses = (clipped_values - returns) ** 2
    loss = 0.5 * token_mean(torch.max(losses, clipped_losses), mask)
    return loss, {"vf_clipfrac": token_mean((clipped_losses > losses).float().detach(), mask)}
