"""Scoring modes: how the evaluator turns records into what a metric needs.

One function per mode, in one registry keyed by the metric's `needs`:

| mode       | the model does                                           | the metric gets                      |
|------------|----------------------------------------------------------|--------------------------------------|
| text       | generates an answer with the task's generation defaults  | predictions, references              |
| choices    | scores each label choice by log-likelihood               | the most likely label (or the log-probs) |
| nll        | scores the reference answer                              | per-example token NLL and count      |
| reward     | generates, then the task's reward functions score it     | per-example total reward             |
| preference | scores chosen and rejected answers (see preference.py)   | per-pair margins                     |

A task with `choices` whose metric reads text (accuracy, exact_match) is scored in `choices` mode: the
answer is the label the model finds most likely, so a chatty reply ("Sure! It is positive.") cannot lose a
point it knew, and no label can be produced that is not a choice (lm-evaluation-harness's multiple-choice
scoring).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from honellm.data.chat import (
    PLAIN_ASSISTANT,
    has_chat_template,
    render_answer,
    render_messages,
    render_prompt,
)
from honellm.errors import HoneError
from honellm.evaluation.metrics import Metric


@dataclass
class EvalContext:
    """Everything a scoring mode reads: the task and program, the model, the records, and the progress bar."""

    task: Any
    program: Any
    artifact: Any
    model: Any
    tokenizer: Any
    generator: Any
    records: list
    demonstrations: list | None  # per record, when the program selects demonstrations per query
    batch_size: int = 16
    seed: int = 0
    bar: Any = None

    def demos(self, i: int):
        return None if self.demonstrations is None else self.demonstrations[i]

    def messages(self, i: int) -> list[dict]:
        return self.program.messages(self.task, self.records[i], self.demos(i))

    def prompts(self) -> list[str]:
        return [render_prompt(self.tokenizer, self.messages(i)) for i in range(len(self.records))]

    def chunks(self, n: int):
        """(start, end) slices of the work; a few batches each, so the engine can still group by length while
        the progress bar moves."""
        size = max(1, self.batch_size * 4)
        for start in range(0, n, size):
            yield start, min(n, start + size)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)


@dataclass
class Scored:
    """What a mode returns: per-example prompts, predictions, references, scores and details, plus extras."""

    prompts: list[str]
    predictions: list[str]
    references: list[str | None]
    scores: list[float]
    details: list[dict] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    completion_tokens: list[int] | None = None
    shared_prefix: str | None = None


ScoringMode = Callable[[EvalContext, Metric], Scored]
SCORING_MODES: dict[str, ScoringMode] = {}


def register_scoring_mode(needs: str):
    def wrap(fn: ScoringMode) -> ScoringMode:
        if needs in SCORING_MODES:
            raise ValueError(f"scoring mode {needs!r} registered twice")
        SCORING_MODES[needs] = fn
        return fn

    return wrap


def scoring_mode(task, metric: Metric) -> str:
    """The mode for `metric` on `task`: its `needs`, except that text metrics on a task with choices score the
    choices by log-likelihood."""
    if metric.needs == "text" and task.config.choices:
        return "choices"
    return metric.needs


# ------------------------------------------------------------------------------------------------ shared pieces


def shared_prefix_text(tokenizer, program, prompts: list[str]) -> str | None:
    """The text every prompt starts with: the program's system turn and fixed demonstrations, rendered.

    The generation engine computes its KV cache once and reuses it for every query. Cut at a turn boundary
    (not at the longest common string) so that tokenising the prefix alone gives the same tokens as inside
    each prompt. None when nothing is shared or a prompt does not start with it.
    """
    messages = program.shared_prefix_messages()
    if not messages or len(prompts) < 2:
        return None
    if has_chat_template(tokenizer):
        prefix = render_messages(tokenizer, messages, add_generation_prompt=False)
    else:
        prefix = render_prompt(tokenizer, messages)[: -len(PLAIN_ASSISTANT)]
    if not prefix or not all(p.startswith(prefix) for p in prompts):
        return None
    return prefix


def answer_affixes(tokenizer) -> tuple[str, str]:
    """What the chat template writes before and after an answer's text (e.g. "" and "<|im_end|>" for ChatML;
    " " and the eos token for a plain layout)."""
    marker = "\x00hone-answer\x00"
    probe = render_answer(tokenizer, [{"role": "user", "content": "x"}], marker)
    before, _, after = probe.partition(marker)
    return before, after


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def score_groups(ctx: EvalContext, contexts: list[str], groups: list[list[str]], *,
                 shared_prefix: str | None = None) -> tuple[list[list[float]], list[list[int]]]:
    """Sum log-probability and token count of each continuation in `groups[i]` after `contexts[i]`.

    Two ways to ask the engine, whichever reads fewer tokens (an estimate from the token counts):
    - all pairs in one call, reusing `shared_prefix` (the system turn and fixed demonstrations) for all: every
      context is read once per continuation, after the shared part;
    - one call per context with the context itself as the shared prefix: each context is read once, and only
      the few tokens of each continuation per continuation. This wins when contexts differ early (per-query
      demonstrations) or there are many choices.
    Either way the progress bar moves by contexts.
    """
    sizes = [len(g) for g in groups]
    logprobs: list[list[float]] = [[0.0] * n for n in sizes]
    counts: list[list[int]] = [[0] * n for n in sizes]
    if not contexts:
        return logprobs, counts
    lengths = count_tokens(ctx.tokenizer, contexts)
    prefix = count_tokens(ctx.tokenizer, [shared_prefix])[0] if shared_prefix else 0
    flat_cost = prefix + sum(n * max(length - prefix, 1) for n, length in zip(sizes, lengths, strict=True))
    if sum(lengths) < flat_cost:
        for i, (context, group) in enumerate(zip(contexts, groups, strict=True)):
            found = ctx.generator.score_continuations([context] * len(group), group, shared_prefix=context)
            logprobs[i] = [float(f.logprob_sum) for f in found]
            counts[i] = [int(f.n_tokens) for f in found]
            ctx.advance(1)
        return logprobs, counts
    step = max(1, ctx.batch_size * 4 // max(max(sizes), 1))
    for start in range(0, len(contexts), step):
        end = min(len(contexts), start + step)
        pairs = [(i, j) for i in range(start, end) for j in range(sizes[i])]
        found = ctx.generator.score_continuations([contexts[i] for i, _ in pairs], [groups[i][j] for i, j in pairs],
                                                  shared_prefix=shared_prefix)
        for (i, j), f in zip(pairs, found, strict=True):
            logprobs[i][j] = float(f.logprob_sum)
            counts[i][j] = int(f.n_tokens)
        ctx.advance(end - start)
    return logprobs, counts


def choice_loglikelihoods(ctx: EvalContext, prompts: list[str], choices: list[str], *,
                          shared_prefix: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Log p(choice | prompt) for every prompt and choice, shape (n_prompts, n_choices), and token counts.

    The continuation is the whole answer turn, end-of-turn token included: its probability is that of the
    model answering exactly this label and stopping, so a label that is a prefix of a longer reply gets no
    credit for it.
    """
    before, after = answer_affixes(ctx.tokenizer)
    continuations = [f"{before}{c}{after}" for c in choices]
    logprobs, counts = score_groups(ctx, prompts, [continuations] * len(prompts), shared_prefix=shared_prefix)
    return (np.array(logprobs, dtype=np.float64).reshape(len(prompts), len(choices)),
            np.array(counts, dtype=np.int64).reshape(len(prompts), len(choices)))


def calibration_vector(program, choices: list[str]) -> np.ndarray | None:
    """The program's contextual-calibration offsets as a vector over `choices` (None when uncalibrated)."""
    if not program.calibration:
        return None
    return np.array([float(program.calibration.get(c, 0.0)) for c in choices])


# ------------------------------------------------------------------------------------------------ modes


def _sampling_params(ctx: EvalContext):
    from honellm.generation import SamplingParams

    g = ctx.task.config.generation
    return SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                          stop=list(g.stop), seed=ctx.seed)


def generate_answers(ctx: EvalContext, prompts: list[str], shared_prefix: str | None) -> list:
    params = _sampling_params(ctx)
    completions = []
    for start, end in ctx.chunks(len(prompts)):
        context = {}
        if getattr(ctx.generator, "takes_context", False):  # best-of-n: its reward may read records or messages
            context = {"records": ctx.records[start:end], "messages": [ctx.messages(i) for i in range(start, end)]}
        completions += ctx.generator.generate(prompts[start:end], params, shared_prefix=shared_prefix, **context)
        ctx.advance(end - start)
    return completions


@register_scoring_mode("text")
def score_text(ctx: EvalContext, metric: Metric) -> Scored:
    """Generate with the task's generation defaults and compare the text with the reference."""
    prompts = ctx.prompts()
    prefix = shared_prefix_text(ctx.tokenizer, ctx.program, prompts)
    completions = generate_answers(ctx, prompts, prefix)
    predictions = [c.text for c in completions]
    references = [ctx.task.target(r) for r in ctx.records]
    scores = metric.fn(predictions=predictions, references=[r or "" for r in references])
    details = [{"finish_reason": c.finish_reason} for c in completions]
    extras: dict[str, Any] = {}
    if any(c.episode is not None for c in completions):  # tool episodes: what the model called, and the turns
        for d, c in zip(details, completions, strict=True):
            d["tool_calls"], d["episode"] = c.tool_calls or 0, c.episode
        calls = [c.tool_calls or 0 for c in completions]
        extras["tool_calls_per_example"] = round(sum(calls) / len(calls), 3)
        extras["examples_with_tool_calls"] = sum(n > 0 for n in calls)
    if ctx.task.config.rewards:
        totals, parts = task_rewards(ctx, prompts, completions)
        extras.update(reward_extras(totals, parts))
        for d, total in zip(details, totals, strict=True):
            d["reward"] = total
    return Scored(prompts, predictions, references, scores, details, extras,
                  completion_tokens=[c.completion_tokens for c in completions], shared_prefix=prefix)


@register_scoring_mode("choices")
def score_choices(ctx: EvalContext, metric: Metric) -> Scored:
    """Score every label choice by log-likelihood; the prediction is the most likely one.

    Reports both of lm-evaluation-harness's numbers: `acc` (sum of the answer's token log-probs, with the
    program's contextual-calibration offsets added when it has them) and `acc_norm` (divided by the label's
    length in characters, never calibrated). The headline is the task's metric: a text metric reads the `acc`
    prediction; `choice_accuracy` is `acc_norm` on raw log-probs.
    """
    choices = list(ctx.task.config.choices)
    prompts = ctx.prompts()
    prefix = shared_prefix_text(ctx.tokenizer, ctx.program, prompts)
    raw, token_counts = choice_loglikelihoods(ctx, prompts, choices, shared_prefix=prefix)
    offsets = calibration_vector(ctx.program, choices)
    calibrated = raw + offsets if offsets is not None else raw
    char_lengths = np.array([max(len(c), 1) for c in choices], dtype=np.float64)
    pred = calibrated.argmax(axis=1)
    pred_norm = (raw / char_lengths).argmax(axis=1)
    references = [ctx.task.target(r) for r in ctx.records]
    ref_index = [choices.index(r) if r in choices else -1 for r in references]
    predictions = [choices[i] for i in pred]
    if metric.needs == "choices":
        scores = metric.fn(choice_logprobs=raw.tolist(), choice_lengths=[list(char_lengths.astype(int))] * len(raw),
                           references=ref_index)
        predictions = [choices[i] for i in pred_norm]
    else:
        scores = metric.fn(predictions=predictions, references=[r or "" for r in references])
    extras: dict[str, Any] = {
        "acc": float(np.mean(pred == np.array(ref_index))),
        "acc_norm": float(np.mean(pred_norm == np.array(ref_index))),
        "calibrated": offsets is not None,
    }
    raw_predictions = [choices[i] for i in raw.argmax(axis=1)]
    if offsets is not None:
        extras["acc_uncalibrated"] = float(np.mean(raw.argmax(axis=1) == np.array(ref_index)))
        if metric.needs != "choices":
            uncalibrated = metric.fn(predictions=raw_predictions, references=[r or "" for r in references])
            extras["score_uncalibrated"] = float(np.mean(uncalibrated))
    counts = np.bincount(pred, minlength=len(choices))
    extras["predicted_label_share"] = {c: round(float(counts[i]) / len(pred), 4) for i, c in enumerate(choices)}
    # full precision: the prompt search re-derives calibrated predictions from these, and must get the same
    # argmax as this function does
    details = [{"choice_logprobs": {c: float(raw[i, j]) for j, c in enumerate(choices)},
                "choice_tokens": {c: int(token_counts[i, j]) for j, c in enumerate(choices)}}
               for i in range(len(prompts))]
    return Scored(prompts, predictions, references, scores, details, extras, shared_prefix=prefix)


@register_scoring_mode("nll")
def score_nll(ctx: EvalContext, metric: Metric) -> Scored:
    """Score the reference answer (as the chat template writes it, end of turn included) under the model."""
    prompts = ctx.prompts()
    references = [ctx.task.target(r) or "" for r in ctx.records]
    answers = [render_answer(ctx.tokenizer, ctx.messages(i), ref) for i, ref in enumerate(references)]
    prefix = shared_prefix_text(ctx.tokenizer, ctx.program, prompts)
    grouped, grouped_counts = score_groups(ctx, prompts, [[a] for a in answers], shared_prefix=prefix)
    nlls, counts = [-g[0] for g in grouped], [c[0] for c in grouped_counts]
    scores = metric.fn(token_nlls=nlls, token_counts=counts)
    total_tokens = max(sum(counts), 1)
    extras = {"corpus_perplexity": math.exp(sum(nlls) / total_tokens), "mean_token_nll": sum(nlls) / total_tokens,
              "target_tokens": sum(counts)}
    details = [{"nll": round(nll, 4), "tokens": n} for nll, n in zip(nlls, counts, strict=True)]
    return Scored(prompts, ["" for _ in prompts], references, scores, details, extras, shared_prefix=prefix)


@register_scoring_mode("reward")
def score_rewards(ctx: EvalContext, metric: Metric) -> Scored:
    """Generate, then score the answers with the task's reward functions (weighted total per example)."""
    if not ctx.task.config.rewards:
        raise HoneError(f"metric {metric.name!r} needs reward functions, and task {ctx.task.name!r} has none",
                        where=ctx.task.source, fix="add e.g. `rewards: [{name: numeric_match}]` to the task")
    prompts = ctx.prompts()
    prefix = shared_prefix_text(ctx.tokenizer, ctx.program, prompts)
    completions = generate_answers(ctx, prompts, prefix)
    predictions = [c.text for c in completions]
    totals, parts = task_rewards(ctx, prompts, completions)
    scores = metric.fn(rewards=[0.0 if math.isnan(t) else t for t in totals])
    references = [ctx.task.target(r) for r in ctx.records]
    details = [{"rewards": {k: v[i] for k, v in parts.items()}} for i in range(len(prompts))]
    return Scored(prompts, predictions, references, scores, details, reward_extras(totals, parts),
                  completion_tokens=[c.completion_tokens for c in completions], shared_prefix=prefix)


# ------------------------------------------------------------------------------------------------ rewards


def task_rewards(ctx: EvalContext, prompts: list[str], completions: list) -> tuple[list[float], dict[str, list[float]]]:
    """The task's reward functions on generated answers: the weighted total and each function's scores.

    Columns follow the reward-function convention: the record's fields, `target` (the task's target) and
    `completion_ids`. An example no function could score (total NaN) counts as 0 in the mean, so that the
    score stays a mean over all n examples; `reward_unscored` in the extras says how many there were.
    """
    texts = [c.text for c in completions]
    keys = sorted({k for r in ctx.records for k in r})
    columns = {k: [r.get(k) for r in ctx.records] for k in keys}
    columns["target"] = [ctx.task.target(r) for r in ctx.records]
    columns["completion_ids"] = [list(c.token_ids) for c in completions]
    from honellm.reward.functions import task_reward

    found = task_reward(ctx.task).score(prompts, texts, **columns)
    return [float(v) for v in found.total], {k: [float(v) for v in vals] for k, vals in found.per_function.items()}


def reward_extras(totals: list[float], parts: dict[str, list[float]], threshold: float = 1.0) -> dict[str, Any]:
    """Mean reward, pass rate (total >= threshold), unscored examples and each function's mean (over the
    examples it scored)."""
    if not totals:
        return {}
    values = np.nan_to_num(np.asarray(totals, dtype=np.float64), nan=0.0)
    extras: dict[str, Any] = {
        "reward_mean": float(values.mean()),
        "reward_pass_rate": float(np.mean(values >= threshold - 1e-9)),
        "reward_unscored": int(np.isnan(np.asarray(totals, dtype=np.float64)).sum()),
    }
    for name, scores in parts.items():
        finite = [s for s in scores if not math.isnan(s)]
        extras[f"reward/{name}"] = float(np.mean(finite)) if finite else math.nan
    return extras


@register_scoring_mode("judge")
def score_with_judge(ctx: EvalContext, metric: Metric) -> Scored:
    """Generate the answers, then ask the task's judge (honellm.evaluation.judges) to compare each with the record's
    reference answer, both orders averaged. A judge whose block names `calibration` pairs is calibrated on them
    first and refused below its bars (its agreement and position bias go into the result's extras); relative
    paths in the block resolve from the task's folder."""
    from honellm.evaluation.judges import reused_judge, text_of

    block = getattr(ctx.task.config, "judge", None)
    if not block:
        raise HoneError(f"metric {metric.name!r} needs a judge, and task {ctx.task.name!r} has none",
                        where=ctx.task.source, fix="add a `judge:` block to the task, e.g. `judge: {model: "
                                                    "smollm2-135m-instruct}`")
    references = [ctx.task.target(r) for r in ctx.records]
    if any(r is None for r in references):
        raise HoneError("judge_win_rate compares with a reference answer, and some records have none",
                        where=ctx.task.source, fix="give every record the task's target field")
    # The judge first: one that fails its calibration is refused before any answer is generated.
    judge, calibration = reused_judge(block, base_dir=ctx.task.base_dir, where=ctx.task.where("judge"))
    prompts = ctx.prompts()
    prefix = shared_prefix_text(ctx.tokenizer, ctx.program, prompts)
    completions = generate_answers(ctx, prompts, prefix)
    predictions = [c.text for c in completions]
    requests = [text_of(ctx.messages(i)[-1]) for i in range(len(prompts))]
    preferences = judge.prefer(requests, predictions, [str(r) for r in references])
    scores = metric.fn(preferences=preferences.tolist())
    details = [{"judge_preference": round(float(p), 4), "finish_reason": c.finish_reason}
               for p, c in zip(preferences, completions, strict=True)]
    extras: dict[str, Any] = {"judge": judge.config.model}
    if calibration is not None:
        extras.update(judge_calibration_pairs=calibration.pairs, judge_agreement=calibration.agreement,
                      judge_agreement_ci=[round(x, 4) for x in calibration.agreement_ci],
                      judge_position_bias=calibration.position_bias)
    return Scored(prompts, predictions, references, scores, details, extras,
                  completion_tokens=[c.completion_tokens for c in completions], shared_prefix=prefix)
