"""Preference scorers: how an artifact says which of two answers it prefers, one registry for every kind.

`preference_accuracy` is the share of pairs whose margin score(chosen) - score(rejected) is positive. What the
score is depends on what the artifact is, so the evaluator looks the scorer up here, by the artifact's
**method** first (e.g. "dpo") and then its **kind** ("prompt", "adapter", "full", "reward_model"):

- plain model, prompt program, SFT adapter, full weights: the answer's mean per-token log-probability
  (registered below as `loglik_margin`); per token, so that a longer answer is not penalised for its length.
- DPO-family adapters (dpo, ipo, cdpo, kto): the implicit reward beta * (log pi(y|x) - log pi_ref(y|x)), with
  pi_ref the same model with the adapter disabled (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, eq. 5);
  ORPO and SimPO (no reference): beta times the per-token log-likelihood margin.
- reward models: the scalar score of the reward head on prompt + answer.

All scorers are registered here, below the recipes that make the artifacts, so evaluation needs no recipe
(docs/architecture.md); a new method adds its scorer here with one `register_preference_scorer` line.

A scorer is a plain callable `(ctx: EvalContext, batch: PreferenceBatch) -> list[float]` (one margin per pair).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from honellm.data.chat import render_answer, render_prompt
from honellm.errors import HoneError
from honellm.evaluation.metrics import Metric
from honellm.evaluation.scoring import EvalContext, Scored, register_scoring_mode, score_groups
from honellm.generation import Generator
from honellm.models import load


@dataclass
class PreferenceBatch:
    """Pairs to compare: the conversation up to the answer (the artifact's program applied), and both answers."""

    messages: list[list[dict]]
    chosen: list[str]
    rejected: list[str]


PreferenceScorer = Callable[..., list[float]]
PREFERENCE_SCORERS: dict[str, PreferenceScorer] = {}


def register_preference_scorer(*names: str):
    """Register a scorer under artifact kinds and/or method names; a name taken twice is an error."""

    def wrap(fn: PreferenceScorer) -> PreferenceScorer:
        for name in names:
            if name in PREFERENCE_SCORERS:
                raise ValueError(f"preference scorer {name!r} registered twice")
            PREFERENCE_SCORERS[name] = fn
        return fn

    return wrap


def preference_scorer_for(artifact) -> PreferenceScorer:
    """The scorer for `artifact`: by its method if one is registered, else by its kind."""
    for key in (artifact.manifest.method, artifact.kind):
        if key in PREFERENCE_SCORERS:
            return PREFERENCE_SCORERS[key]
    raise HoneError(f"no preference scorer for {artifact.kind} artifacts (method {artifact.manifest.method})",
                    where=str(artifact.path) if artifact.path else artifact.name,
                    fix=f"scorers exist for: {', '.join(PREFERENCE_SCORERS)}")


def answer_logprobs(ctx, batch: PreferenceBatch) -> tuple[list[float], list[int], list[float], list[int]]:
    """Sum log-probs and token counts of the chosen and rejected answers (each as the chat template writes
    it, end of turn included) under the model as it is now."""
    contexts, groups = [], []
    for messages, chosen, rejected in zip(batch.messages, batch.chosen, batch.rejected, strict=True):
        contexts.append(render_prompt(ctx.tokenizer, messages))
        groups.append([render_answer(ctx.tokenizer, messages, chosen), render_answer(ctx.tokenizer, messages, rejected)])
    logprobs, counts = score_groups(ctx, contexts, groups)
    return ([lp[0] for lp in logprobs], [n[0] for n in counts], [lp[1] for lp in logprobs], [n[1] for n in counts])


@register_preference_scorer("prompt", "adapter", "full")
def loglik_margin(ctx, batch: PreferenceBatch) -> list[float]:
    """log p(chosen) per token - log p(rejected) per token, under the artifact's model and program."""
    chosen_lp, chosen_n, rejected_lp, rejected_n = answer_logprobs(ctx, batch)
    return [c / max(cn, 1) - r / max(rn, 1) for c, cn, r, rn in zip(chosen_lp, chosen_n, rejected_lp, rejected_n, strict=True)]


def dpo_implicit_margins(ctx, batch: PreferenceBatch, *, beta: float = 0.1) -> list[float]:
    """DPO's implicit reward margin beta*[(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))], sums over tokens.

    The policy is `ctx.model` (a PeftModel); the reference is the same model under `disable_adapter()`, so no
    second copy of the weights is loaded.
    """
    if not hasattr(ctx.model, "disable_adapter"):
        raise HoneError("the DPO implicit reward needs an adapter model (the reference is the model without it)",
                        fix="evaluate a DPO artifact that has an adapter/ folder")
    policy_c, _, policy_r, _ = answer_logprobs(ctx, batch)
    bar, ctx.bar = ctx.bar, None  # one pass of progress per example, not two
    try:
        with ctx.model.disable_adapter():
            ref_c, _, ref_r, _ = answer_logprobs(ctx, batch)
    finally:
        ctx.bar = bar
    return [beta * ((pc - rc) - (pr - rr)) for pc, rc, pr, rr in zip(policy_c, ref_c, policy_r, ref_r, strict=True)]


# ------------------------------------------------------------------------ scorers of the reward-based methods


def _beta(ctx, default: float) -> float:
    return float((ctx.artifact.manifest.config or {}).get("beta", default))


@register_preference_scorer("dpo", "ipo", "cdpo", "kto")
def implicit_reward_margins(ctx, batch) -> list[float]:
    """`hone eval` of a reference-based artifact: beta * [(log pi - log ref)(chosen) - (log pi - log ref)(rejected)].

    The reference is the artifact's model with its adapter disabled; a fully fine-tuned artifact's reference is the
    base model, loaded beside it.
    """
    beta = _beta(ctx, 0.1)
    if hasattr(ctx.model, "disable_adapter"):
        return dpo_implicit_margins(ctx, batch, beta=beta)
    policy_c, _, policy_r, _ = answer_logprobs(ctx, batch)
    base, tokenizer = load(ctx.artifact.base_model, device=str(next(ctx.model.parameters()).device))
    ref_ctx = dataclasses.replace(ctx, model=base, generator=Generator(base, tokenizer, batch_size=ctx.batch_size),
                                  bar=None)
    ref_c, _, ref_r, _ = answer_logprobs(ref_ctx, batch)
    return [beta * ((pc - rc) - (pr - rr)) for pc, rc, pr, rr in zip(policy_c, ref_c, policy_r, ref_r, strict=True)]


@register_preference_scorer("orpo", "simpo")
def length_normalised_margins(ctx, batch) -> list[float]:
    """`hone eval` of a reference-free artifact: beta * (mean log-prob of chosen - mean log-prob of rejected)."""
    beta = _beta(ctx, 0.1)
    return [beta * m for m in loglik_margin(ctx, batch)]


@register_preference_scorer("reward_model")
def reward_model_margins(ctx, batch) -> list[float]:
    """`hone eval` of a reward model: score(chosen) - score(rejected) under the reward head."""
    # start-up time: the reward model (torch) loads only when a reward model is evaluated
    from honellm.reward.reward_model import RewardModel

    rm = RewardModel.from_artifact(ctx.artifact, ctx.model, ctx.tokenizer)
    margins = []
    step = max(1, ctx.batch_size // 2)
    for start in range(0, len(batch.messages), step):
        end = min(len(batch.messages), start + step)
        messages = batch.messages[start:end]
        scores = rm.score(messages + messages, batch.chosen[start:end] + batch.rejected[start:end],
                          batch_size=ctx.batch_size, apply_program=False)
        n = end - start
        margins += [c - r for c, r in zip(scores[:n], scores[n:], strict=True)]
        ctx.advance(n)
    return margins


# ------------------------------------------------------------------------------------------------ the scoring mode


@register_scoring_mode("preference")
def score_preferences(ctx: EvalContext, metric: Metric) -> Scored:
    """Pairwise: does the artifact score the chosen answer above the rejected one? (see preference.py)"""
    pairs = [ctx.task.pair(r) for r in ctx.records]
    messages = [ctx.program.chat_messages(p.prompt, ctx.demos(i)) for i, p in enumerate(pairs)]
    batch = PreferenceBatch(messages, [p.chosen for p in pairs], [p.rejected for p in pairs])
    scorer = preference_scorer_for(ctx.artifact)
    margins = scorer(ctx, batch)
    scores = metric.fn(margins=margins)
    prompts = [render_prompt(ctx.tokenizer, m) for m in messages]
    predictions = ["chosen" if m > 0 else "rejected" for m in margins]
    extras = {"mean_margin": float(np.mean(margins)), "preference_scorer": scorer.__name__}
    details = [{"margin": round(float(m), 4)} for m in margins]
    return Scored(prompts, predictions, ["chosen"] * len(pairs), scores, details, extras)
