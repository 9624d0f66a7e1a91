"""Preference scorers: how an artifact says which of two answers it prefers, one registry for every kind.

`preference_accuracy` is the share of pairs whose margin score(chosen) - score(rejected) is positive. What the
score is depends on what the artifact is, so the evaluator looks the scorer up here, by the artifact's
**method** first (e.g. "dpo") and then its **kind** ("prompt", "adapter", "full", "reward_model"):

- plain model, prompt program, SFT adapter, full weights: the answer's mean per-token log-probability
  (registered below as `loglik_margin`); per token, so that a longer answer is not penalised for its length.
- DPO-family adapters: the implicit reward beta * (log pi(y|x) - log pi_ref(y|x)), with pi_ref the same model
  with the adapter disabled (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, eq. 5). `dpo_implicit_margins`
  below computes it; the DPO recipe registers it for its method with one line:

      register_preference_scorer("dpo")(functools.partial(dpo_implicit_margins, beta=0.1))

  (or a small function that reads beta from `ctx.artifact.manifest.config`).
- reward models: the scalar score of the reward head on prompt + answer; the reward-model recipe registers a
  scorer for kind "reward_model".

A scorer is a plain callable `(ctx: EvalContext, batch: PreferenceBatch) -> list[float]` (one margin per pair).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from honellm.data.chat import render_answer, render_prompt
from honellm.errors import HoneError


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
    from honellm.reward.recipes import all_align_methods

    all_align_methods()  # the align recipes register their scorers beside their methods (dpo, reward_model, ...)
    for key in (artifact.manifest.method, artifact.kind):
        if key in PREFERENCE_SCORERS:
            return PREFERENCE_SCORERS[key]
    raise HoneError(f"no preference scorer for {artifact.kind} artifacts (method {artifact.manifest.method})",
                    where=str(artifact.path) if artifact.path else artifact.name,
                    fix=f"scorers exist for: {', '.join(PREFERENCE_SCORERS)}")


def answer_logprobs(ctx, batch: PreferenceBatch) -> tuple[list[float], list[int], list[float], list[int]]:
    """Sum log-probs and token counts of the chosen and rejected answers (each as the chat template writes
    it, end of turn included) under the model as it is now."""
    from honellm.evaluation.scoring import continuation_logprobs

    contexts, continuations = [], []
    for messages, chosen, rejected in zip(batch.messages, batch.chosen, batch.rejected, strict=True):
        prompt = render_prompt(ctx.tokenizer, messages)
        contexts += [prompt, prompt]
        continuations += [render_answer(ctx.tokenizer, messages, chosen), render_answer(ctx.tokenizer, messages, rejected)]
    logprobs, counts = continuation_logprobs(ctx, contexts, continuations, group=2)
    return logprobs[0::2], counts[0::2], logprobs[1::2], counts[1::2]


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
