"""Metrics: plain functions in one registry.

A metric maps predictions and references to one score per example (so that every metric gets a bootstrap
confidence interval the same way); the task's score is the mean. `needs` says what the evaluator must
produce for it: generated text (default), choice log-likelihoods, per-token losses, rewards or preference
margins.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[..., list[float]]
    needs: str  # "text" | "choices" | "nll" | "reward" | "preference"
    higher_is_better: bool = True
    describe: str = ""


METRICS: dict[str, Metric] = {}


def register_metric(name: str, needs: str = "text", higher_is_better: bool = True, describe: str = ""):
    def wrap(fn):
        if name in METRICS:
            raise ValueError(f"metric {name!r} registered twice")
        METRICS[name] = Metric(name, fn, needs, higher_is_better, describe or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


# ------------------------------------------------------------------------------------------------ normalisation

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str, *, lower: bool = True, strip_punct: bool = True, strip_articles: bool = True,
                   collapse_space: bool = True) -> str:
    """SQuAD-style answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = str(text)
    if lower:
        text = text.lower()
    if strip_punct:
        text = text.translate(_PUNCT)
    if strip_articles:
        text = _ARTICLES.sub(" ", text)
    if collapse_space:
        text = " ".join(text.split())
    return text.strip()


def first_line(text: str) -> str:
    stripped = str(text).strip()
    return stripped.split("\n", 1)[0].strip() if stripped else ""


# ------------------------------------------------------------------------------------------------ text metrics


@register_metric("accuracy", describe="the prediction (first line, normalised) equals the label")
def accuracy(predictions: list[str], references: list[str], **_) -> list[float]:
    """Label accuracy: the first line of the prediction, normalised, equals the normalised reference.

    With `choices` the evaluator scores choices by log-likelihood and passes the chosen label as prediction.
    """
    return [float(normalize_text(first_line(p)) == normalize_text(r)) for p, r in zip(predictions, references, strict=True)]


@register_metric("exact_match", describe="normalised prediction equals the reference")
def exact_match(predictions: list[str], references: list[str], *, lower: bool = True, strip_punct: bool = True,
                strip_articles: bool = True, **_) -> list[float]:
    """Exact match after normalisation (lower case, punctuation and articles removed, spaces collapsed)."""
    norm = {"lower": lower, "strip_punct": strip_punct, "strip_articles": strip_articles}
    return [float(normalize_text(p, **norm) == normalize_text(r, **norm)) for p, r in zip(predictions, references, strict=True)]


@register_metric("token_f1", describe="SQuAD token-overlap F1")
def token_f1(predictions: list[str], references: list[str], **_) -> list[float]:
    """Token-overlap F1 between normalised prediction and reference (SQuAD v1.1 evaluation script)."""
    scores = []
    for p, r in zip(predictions, references, strict=True):
        pred, ref = normalize_text(p).split(), normalize_text(r).split()
        if not pred or not ref:
            scores.append(float(pred == ref))
            continue
        common = sum((Counter(pred) & Counter(ref)).values())
        if common == 0:
            scores.append(0.0)
            continue
        precision, recall = common / len(pred), common / len(ref)
        scores.append(2 * precision * recall / (precision + recall))
    return scores


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


@register_metric("rouge_l", describe="ROUGE-L F-measure over lower-cased tokens")
def rouge_l(predictions: list[str], references: list[str], *, beta: float = 1.0, **_) -> list[float]:
    """ROUGE-L: F-measure of the longest common subsequence of lower-cased word tokens (Lin 2004)."""
    scores = []
    for p, r in zip(predictions, references, strict=True):
        pred, ref = re.findall(r"\w+", p.lower()), re.findall(r"\w+", r.lower())
        if not pred or not ref:
            scores.append(float(pred == ref))
            continue
        lcs = _lcs(pred, ref)
        if lcs == 0:
            scores.append(0.0)
            continue
        precision, recall = lcs / len(pred), lcs / len(ref)
        scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    return scores


# A minus sign counts only where no word character precedes it, so "10-15" reads as 10 and 15, not 10 and -15;
# ".5" is a number too.
_NUMBER = re.compile(r"(?:(?<!\w)-)?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def parse_number(text: str) -> float | None:
    """A number from text: `#### n` (GSM8K) when present, else the last number; commas, `$` and `.0` tolerated."""
    text = str(text)
    marker = re.search(r"####\s*(-?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+))", text)
    found = marker.group(1) if marker else (_NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    cleaned = found.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


@register_metric("numeric_match", describe="the answer's number equals the reference's (GSM8K ####, else last number)")
def numeric_match(predictions: list[str], references: list[str], *, tolerance: float = 1e-6, **_) -> list[float]:
    """Numeric answer match: GSM8K's `#### n` in either text, else its last number; equal within `tolerance`."""
    scores = []
    for p, r in zip(predictions, references, strict=True):
        a, b = parse_number(p), parse_number(r)
        scores.append(float(a is not None and b is not None and abs(a - b) <= tolerance * max(1.0, abs(b))))
    return scores


# ------------------------------------------------------------------------------------------------ model-scored metrics
# The evaluator computes what these need (choice log-likelihoods, rewards, margins, token losses) and passes it in.


@register_metric("choice_accuracy", needs="choices", describe="the most likely choice (length-normalised) is the label")
def choice_accuracy(choice_logprobs: list[list[float]], choice_lengths: list[list[int]], references: list[int], *,
                    normalize: bool = True, **_) -> list[float]:
    """Choice scoring by log-likelihood, as lm-evaluation-harness does: `acc` (sum) or `acc_norm` (per character
    length of the choice text when `choice_lengths` are character counts, or per token when they are token counts)."""
    scores = []
    for logprobs, lengths, ref in zip(choice_logprobs, choice_lengths, references, strict=True):
        values = [lp / max(n, 1) for lp, n in zip(logprobs, lengths, strict=True)] if normalize else list(logprobs)
        scores.append(float(max(range(len(values)), key=values.__getitem__) == ref))
    return scores


@register_metric("reward_mean", needs="reward", describe="mean of the task's weighted reward functions")
def reward_mean(rewards: list[float], **_) -> list[float]:
    """The task's total reward per example (weighted sum of its reward functions); the mean is the score."""
    return [float(r) for r in rewards]


@register_metric("reward_pass_rate", needs="reward", describe="share of examples whose reward reaches the threshold")
def reward_pass_rate(rewards: list[float], *, threshold: float = 1.0, **_) -> list[float]:
    return [float(r >= threshold - 1e-9) for r in rewards]


@register_metric("reward_model_score", needs="reward", describe="mean score a reward model gives the predictions")
def reward_model_score(rewards: list[float], **_) -> list[float]:
    return [float(r) for r in rewards]


@register_metric("preference_accuracy", needs="preference", describe="chosen scores above rejected")
def preference_accuracy(margins: list[float], **_) -> list[float]:
    """Pairwise accuracy: the chosen answer's score (reward model, DPO implicit reward, or log-likelihood for a
    plain model) is above the rejected one's. Ties count as wrong."""
    return [float(m > 0) for m in margins]


@register_metric("perplexity", needs="nll", higher_is_better=False, describe="exp of the mean per-token loss on the target")
def perplexity(token_nlls: list[float], token_counts: list[int], **_) -> list[float]:
    """Per-example perplexity exp(NLL / tokens); the evaluator also reports the corpus perplexity
    exp(sum NLL / sum tokens), which is the usual headline number."""
    import math

    return [math.exp(nll / max(n, 1)) for nll, n in zip(token_nlls, token_counts, strict=True)]


@register_metric("judge_win_rate", needs="judge", describe="share of answers a judge prefers to the reference "
                                                           "answer (ties count half)")
def judge_win_rate(preferences: list[float], **_) -> list[float]:
    """Per example: 1 where the judge prefers the answer, 0.5 on a tie, 0 where it prefers the reference
    (honellm.evaluation.judges; the task's `judge:` block names the judge)."""
    return [1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in preferences]
