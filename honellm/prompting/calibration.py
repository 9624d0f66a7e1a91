"""Contextual calibration (Zhao et al. 2021, "Calibrate Before Use", https://arxiv.org/abs/2102.09690).

A small model given a prompt leans towards some labels whatever the input (majority, recency and common-token
biases). Calibration measures that lean with *content-free* inputs ("N/A", "", "[MASK]") put through the
very same prompt, and divides it out:

    p_cf = mean over content-free inputs of p(label | prompt with that input), renormalised over the labels
    calibrated p(label | x) ∝ p(label | x) / p_cf(label)      (the paper's W = diag(p_cf)^-1, b = 0)

In log space this is an additive offset per label, `-log p_cf(label)`, saved in the prompt program
(`PromptProgram.calibration`) and added by the evaluator to each label's log-likelihood before the argmax.

Where the paper renormalises p over the labels first, the offsets here are centred (they sum to zero): either
way the argmax is the same. With per-query demonstrations there is no single prompt; the content-free
inputs then get the demonstrations the selector picks for them from the pool.
"""

from __future__ import annotations

import numpy as np

from honellm.data.chat import render_prompt
from honellm.data.formats import template_fields
from honellm.errors import HoneError

CONTENT_FREE = ("N/A", "", "[MASK]")


def content_free_messages(task, program, text: str, demonstrations=None) -> list[dict]:
    """The prompt's messages with every field of the query replaced by the content-free `text`."""
    template = program.template or task.template_for()
    if template:
        record = {name: text for name in template_fields(template)}
        return program.messages(task, record, demonstrations)
    return program.chat_messages([{"role": "user", "content": text}], demonstrations)


def contextual_calibration(task, program, model, tokenizer, *, pool: list[dict] | None = None,
                           content_free: tuple[str, ...] = CONTENT_FREE, seed: int = 0, batch_size: int = 16,
                           encoder=None) -> dict[str, float]:
    """Per-label log-probability offsets that cancel the prompt's label bias (see the module docstring)."""
    from honellm.evaluation.scoring import EvalContext, choice_loglikelihoods
    from honellm.generation import Generator

    choices = task.config.choices
    if not choices:
        raise HoneError(f"contextual calibration needs label choices, and task {task.name!r} has none",
                        where=task.source, fix="add `choices: [...]` to the task, or drop --calibrate")
    demos = [None] * len(content_free)
    if program.selector is not None and program.selector.per_query:
        from honellm.prompting.program import Demonstration
        from honellm.prompting.selectors import DemoPool, select_indices

        demo_pool = DemoPool.build(task, program, pool or [])
        chosen = select_indices(program.selector, [t for t in content_free], demo_pool, model=model,
                                tokenizer=tokenizer, seed=seed, encoder=encoder)
        demos = [[Demonstration(query=demo_pool.queries[i], answer=demo_pool.answers[i]) for i in idx]
                 for idx in chosen]
    prompts = [render_prompt(tokenizer, content_free_messages(task, program, text, d))
               for text, d in zip(content_free, demos, strict=True)]
    ctx = EvalContext(task=task, program=program, artifact=None, model=model, tokenizer=tokenizer,
                      generator=Generator(model, tokenizer, batch_size=batch_size), records=[], demonstrations=None,
                      batch_size=batch_size, seed=seed)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        logprobs, _ = choice_loglikelihoods(ctx, prompts, list(choices))
    finally:
        if was_training:
            model.train()
    return calibration_offsets(logprobs, list(choices))


def calibration_offsets(logprobs: np.ndarray, choices: list[str]) -> dict[str, float]:
    """Offsets from content-free log-likelihoods of shape (n_content_free, n_choices): -log of the mean
    renormalised probability of each label, centred to sum to zero."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    # in log space throughout: a small model can put a label 30+ nats below another, beyond float probabilities
    log_probs = logprobs - _logsumexp(logprobs, axis=1, keepdims=True)  # renormalised over the labels
    log_p_cf = _logsumexp(log_probs, axis=0) - np.log(len(log_probs))  # log of the mean probability
    offsets = -log_p_cf
    offsets -= offsets.mean()
    return {c: round(float(o), 6) for c, o in zip(choices, offsets, strict=True)}


def _logsumexp(x: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    out = top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))
    return out if keepdims else out.squeeze(axis)
