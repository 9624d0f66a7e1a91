"""Calibration of label choices: per-label log-probability offsets that cancel a prompt's label bias.

A small model given a prompt leans towards some labels whatever the input (majority, recency and common-token
biases). Both methods here estimate that lean as a mean label distribution p_bias over some inputs put through
the very same prompt, and divide it out:

    calibrated p(label | x) ∝ p(label | x) / p_bias(label)     (Zhao et al.'s W = diag(p_bias)^-1, b = 0)

In log space this is an additive offset per label, `-log p_bias(label)`, saved in the prompt program
(`PromptProgram.calibration`) and added by the evaluator to each label's log-likelihood before the argmax.
The offsets are centred (they sum to zero); the argmax is the same either way.

| method       | p_bias is the mean over                                  | paper |
|--------------|----------------------------------------------------------|-------|
| content_free | content-free inputs "N/A", "", "[MASK]" in every field of the query | Zhao et al. 2021, Calibrate Before Use, https://arxiv.org/abs/2102.09690 |
| batch        | a seeded sample of real *training* inputs (labels unused) | Zhou et al. 2024, Batch Calibration, https://arxiv.org/abs/2309.17249 |

Content-free inputs measure the bias the prompt shows on "no input"; on small models the bias on real inputs
can differ (SmolLM2-135M calls 73% of SST-2 reviews negative after content-free calibration). Batch
calibration measures it on real inputs. Zhou et al. estimate it on the test batch; here it comes from training
inputs, so nothing about the evaluated split is used. With per-query demonstrations each calibration input
gets the demonstrations the selector picks for it (never itself).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from honellm.data.chat import render_prompt
from honellm.data.formats import template_fields
from honellm.errors import HoneError

CONTENT_FREE = ("N/A", "", "[MASK]")
BATCH_SIZE = 64  # training inputs batch calibration averages over


def content_free_messages(task, program, text: str, demonstrations=None) -> list[dict]:
    """The prompt's messages with every field of the query replaced by the content-free `text`."""
    template = program.template or task.template_for()
    if template:
        record = {name: text for name in template_fields(template)}
        return program.messages(task, record, demonstrations)
    return program.chat_messages([{"role": "user", "content": text}], demonstrations)


def _demonstrations_for(task, program, queries: list[str], pool, model, tokenizer, seed, encoder) -> list:
    """Per-query demonstrations for calibration inputs (None each when the program's are fixed)."""
    if program.selector is None or not program.selector.per_query:
        return [None] * len(queries)
    from honellm.program import Demonstration
    from honellm.runtime.selectors import DemoPool, select_indices

    demo_pool = DemoPool.build(task, program, pool or [])
    chosen = select_indices(program.selector, queries, demo_pool, model=model, tokenizer=tokenizer, seed=seed,
                            encoder=encoder)
    return [[Demonstration(query=demo_pool.queries[i], answer=demo_pool.answers[i]) for i in idx] for idx in chosen]


def _choice_logprobs(task, program, model, tokenizer, prompts: list[str], batch_size: int, seed: int) -> np.ndarray:
    from honellm.evaluation.scoring import EvalContext, choice_loglikelihoods
    from honellm.generation import Generator

    ctx = EvalContext(task=task, program=program, artifact=None, model=model, tokenizer=tokenizer,
                      generator=Generator(model, tokenizer, batch_size=batch_size), records=[], demonstrations=None,
                      batch_size=batch_size, seed=seed)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        logprobs, _ = choice_loglikelihoods(ctx, prompts, list(task.config.choices))
    finally:
        if was_training:
            model.train()
    return logprobs


def _need_choices(task) -> None:
    if not task.config.choices:
        raise HoneError(f"calibration needs label choices, and task {task.name!r} has none",
                        where=task.source, fix="add `choices: [...]` to the task, or drop --calibrate")


def contextual_calibration(task, program, model, tokenizer, *, pool: list[dict] | None = None,
                           content_free: tuple[str, ...] = CONTENT_FREE, seed: int = 0, batch_size: int = 16,
                           encoder=None) -> dict[str, float]:
    """Offsets from content-free inputs (Zhao et al. 2021; see the module docstring)."""
    _need_choices(task)
    demos = _demonstrations_for(task, program, list(content_free), pool, model, tokenizer, seed, encoder)
    prompts = [render_prompt(tokenizer, content_free_messages(task, program, text, d))
               for text, d in zip(content_free, demos, strict=True)]
    logprobs = _choice_logprobs(task, program, model, tokenizer, prompts, batch_size, seed)
    return calibration_offsets(logprobs, list(task.config.choices))


def batch_calibration(task, program, model, tokenizer, *, pool: list[dict] | None = None, size: int = BATCH_SIZE,
                      seed: int = 0, batch_size: int = 16, encoder=None) -> dict[str, float]:
    """Offsets from a seeded sample of `size` training inputs, labels unused (Zhou et al. 2024)."""
    from honellm.runtime.selectors import query_text

    _need_choices(task)
    records = list(pool) if pool else list(task.split("train"))
    sample = random.Random(seed).sample(records, min(size, len(records)))
    queries = [query_text(task, program, r) for r in sample]
    demos = _demonstrations_for(task, program, queries, pool or records, model, tokenizer, seed, encoder)
    prompts = [render_prompt(tokenizer, program.messages(task, r, d)) for r, d in zip(sample, demos, strict=True)]
    logprobs = _choice_logprobs(task, program, model, tokenizer, prompts, batch_size, seed)
    return calibration_offsets(logprobs, list(task.config.choices))


CALIBRATIONS: dict[str, Callable[..., dict[str, float]]] = {}


def register_calibration(name: str, fn: Callable[..., dict[str, float]]) -> None:
    if name in CALIBRATIONS:
        raise ValueError(f"calibration {name!r} registered twice")
    CALIBRATIONS[name] = fn


register_calibration("content_free", contextual_calibration)
register_calibration("batch", batch_calibration)


def calibrate(method: str, task, program, model, tokenizer, **kwargs) -> dict[str, float]:
    """Offsets by the named method (content_free or batch)."""
    if method not in CALIBRATIONS:
        raise HoneError(f"unknown calibration {method!r}", where="calibration",
                        fix=f"use one of: {', '.join(CALIBRATIONS)}")
    return CALIBRATIONS[method](task, program, model, tokenizer, **kwargs)


def calibration_offsets(logprobs: np.ndarray, choices: list[str]) -> dict[str, float]:
    """Offsets from log-likelihoods of shape (n_inputs, n_choices): -log of the mean renormalised probability
    of each label, centred to sum to zero."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    # in log space throughout: a small model can put a label 30+ nats below another, beyond float probabilities
    log_probs = logprobs - _logsumexp(logprobs, axis=1, keepdims=True)  # renormalised over the labels
    log_p_bias = _logsumexp(log_probs, axis=0) - np.log(len(log_probs))  # log of the mean probability
    offsets = -log_p_bias
    offsets -= offsets.mean()
    return {c: round(float(o), 6) for c, o in zip(choices, offsets, strict=True)}


def _logsumexp(x: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    out = top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))
    return out if keepdims else out.squeeze(axis)
