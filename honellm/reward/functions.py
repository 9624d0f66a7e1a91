"""Reward functions: plain callables, one registry, built from the task's `rewards:` specs.

A reward is `(prompts: list[str], completions: list[str], **columns) -> list[float | None]`, called by keyword
as TRL calls it (trl/rewards/accuracy_rewards.py), so TRL's reward functions work here too: `columns` are record fields as lists aligned with the completions, plus what
the recipe adds, by convention `target` (the task's target field) and `completion_ids` (token ids of each
completion). A completion may also be a chat message list; its last message's content is scored. `None` means
"cannot score this one" (e.g. the reference has no number); it is left out of the weighted total.

Built-ins are factories registered by name in `REWARD_FUNCTIONS`: a spec `{name: regex, pattern: "...",
weight: 0.5}` calls `regex(pattern="...")` and weighs the result by 0.5. User rewards come from a Python file
named in the task YAML, `{python: my_rewards.py:brevity, weight: 0.1}`, imported only when named.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from honellm.errors import HoneError
from honellm.evaluation.metrics import normalize_text  # one SQuAD normalisation for metrics and rewards
from honellm.plugins import import_function

Reward = Callable[..., list[float | None]]

REWARD_FUNCTIONS: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str, factory: Callable[..., Reward]) -> None:
    """Register a reward factory under `name`; its keyword arguments are the spec's parameters."""
    if name in REWARD_FUNCTIONS:
        raise ValueError(f"reward {name!r} is already registered")
    REWARD_FUNCTIONS[name] = factory


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared by the built-ins


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, a message dict, or a chat list (the last message's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, Sequence) and completion:
        return completion_text(completion[-1])
    return ""


def _column(columns: dict[str, Any], name: str, n: int, reward: str) -> list[Any]:
    """The record field `name`, checked to hold one value per completion."""
    if name not in columns:
        have = ", ".join(sorted(columns)) or "none"
        raise HoneError(
            f"reward {reward!r} needs the record field {name!r}, which the batch does not have (fields: {have})",
            where="rewards",
            fix=f"set `column:` in the {reward} spec to the field that holds the reference, or add {name!r} to the data",
        )
    values = list(columns[name])
    if len(values) != n:
        raise ValueError(f"field {name!r} has {len(values)} values for {n} completions")
    return values


# A number: thousands separated by commas or plain digits, optional decimals; or a bare decimal like .5
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_GSM8K_ANSWER = re.compile(r"####\s*(.+)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def parse_number(text: str) -> float | None:
    """The first number in `text`, tolerant of `$`, thousands commas and a trailing `.0`; None if there is none."""
    match = _NUMBER.search(str(text).replace("$", "").replace("\u2212", "-"))
    return float(match.group().replace(",", "")) if match else None


def extract_answer_number(text: str) -> float | None:
    """The number a completion answers with: after `####` (GSM8K), else in `\\boxed{}`, else the last number."""
    text = str(text)
    for pattern in (_GSM8K_ANSWER, _BOXED):
        matches = pattern.findall(text)
        if matches and (number := parse_number(matches[-1])) is not None:
            return number
    numbers = _NUMBER.findall(text.replace("$", "").replace("\u2212", "-"))
    return float(numbers[-1].replace(",", "")) if numbers else None


# ---------------------------------------------------------------------------------------------------------------
# Built-in rewards (factories; the spec's parameters are their keyword arguments)


def exact_match(column: str = "target", normalize: bool = True, extract: str | None = None) -> Reward:
    """1.0 when the completion equals the reference (SQuAD-normalised unless `normalize` is false), else 0.0.

    `extract`: a regex whose first group (or whole match) is the answer inside the completion, e.g.
    `"<answer>(.*?)</answer>"`; no match scores 0. A reference that is a list accepts any of its items.
    """
    pattern = _compile(extract, "extract") if extract else None
    norm = normalize_text if normalize else (lambda s: str(s).strip())

    def exact_match_reward(prompts: list[str], completions: list[Any], **columns: Any) -> list[float | None]:
        references = _column(columns, column, len(completions), "exact_match")
        scores: list[float | None] = []
        for completion, reference in zip(completions, references, strict=True):
            text = completion_text(completion)
            if pattern is not None:
                match = pattern.search(text)
                if match is None:
                    scores.append(0.0)
                    continue
                text = match.group(1) if pattern.groups else match.group()
            options = reference if isinstance(reference, list | tuple) else [reference]
            scores.append(float(any(norm(text) == norm(option) for option in options)))
        return scores

    return exact_match_reward


register_reward("exact_match", exact_match)


def numeric_match(column: str = "target", rel_tol: float = 1e-6) -> Reward:
    """1.0 when the completion's answer number equals the reference number, else 0.0; None if the reference has none.

    Reference: the number after `####` (a GSM8K answer), else the first number in it. Prediction: after `####`,
    else in `\\boxed{}`, else the last number in the completion. `$`, thousands commas and `.0` are ignored
    (`$1,000.00` equals `1000`).
    """

    def numeric_match_reward(
        prompts: list[str], completions: list[Any], **columns: Any
    ) -> list[float | None]:
        references = _column(columns, column, len(completions), "numeric_match")
        scores: list[float | None] = []
        for completion, reference in zip(completions, references, strict=True):
            gsm8k = _GSM8K_ANSWER.search(str(reference))
            expected = parse_number(gsm8k.group(1) if gsm8k else str(reference))
            if expected is None:
                scores.append(None)
                continue
            predicted = extract_answer_number(completion_text(completion))
            scores.append(float(predicted is not None and math.isclose(predicted, expected, rel_tol=rel_tol)))
        return scores

    return numeric_match_reward


register_reward("numeric_match", numeric_match)


def _compile(pattern: str, parameter: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise ValueError(f"`{parameter}` is not a valid regular expression ({err}): {pattern!r}") from err


def regex(pattern: str, ignore_case: bool = False) -> Reward:
    """1.0 when `pattern` occurs anywhere in the completion (`re.search`, `.` matches newlines), else 0.0."""
    compiled = _compile(pattern, "pattern")
    if ignore_case:
        compiled = re.compile(compiled.pattern, compiled.flags | re.IGNORECASE)

    def regex_reward(prompts: list[str], completions: list[Any], **columns: Any) -> list[float | None]:
        return [float(compiled.search(completion_text(c)) is not None) for c in completions]

    return regex_reward


register_reward("regex", regex)

DEFAULT_FORMAT = r"\s*(?:<think>.*?</think>\s*)?<answer>.*?</answer>\s*"


def format_match(pattern: str = DEFAULT_FORMAT) -> Reward:
    """The `format` reward: 1.0 when the *whole* completion matches `pattern` (`re.fullmatch`), else 0.0.

    Default: an optional `<think>...</think>` then one `<answer>...</answer>` and nothing else.
    """
    compiled = _compile(pattern, "pattern")

    def format_reward(prompts: list[str], completions: list[Any], **columns: Any) -> list[float | None]:
        return [float(compiled.fullmatch(completion_text(c)) is not None) for c in completions]

    return format_reward


register_reward("format", format_match)

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL | re.IGNORECASE)


def json_valid(required_keys: list[str] | None = None) -> Reward:
    """1.0 when the completion is valid JSON (a ```json fence around it is allowed), else 0.0.

    With `required_keys`, it must also be an object holding every one of them.
    """
    keys = list(required_keys or [])

    def json_valid_reward(prompts: list[str], completions: list[Any], **columns: Any) -> list[float | None]:
        scores: list[float | None] = []
        for completion in completions:
            text = completion_text(completion)
            fenced = _FENCE.match(text)
            try:
                value = json.loads(fenced.group(1) if fenced else text)
            except ValueError:
                scores.append(0.0)
                continue
            scores.append(float(not keys or (isinstance(value, dict) and all(k in value for k in keys))))
        return scores

    return json_valid_reward


register_reward("json_valid", json_valid)

LENGTH_UNITS = ("char", "word", "token")


def length_penalty(target: int, unit: str = "char", over_only: bool = False) -> Reward:
    """`-min(1, |length - target| / target)`: 0 at the target length, down to -1 at twice (or zero) the target.

    `unit`: `char`, `word` (whitespace-separated) or `token` (from the `completion_ids` column the recipe passes).
    `over_only`: only completions longer than the target are penalised.
    """
    if target <= 0:
        raise ValueError(f"`target` must be a positive length, got {target}")
    if unit not in LENGTH_UNITS:
        raise ValueError(f"`unit` must be one of {', '.join(LENGTH_UNITS)}, got {unit!r}")

    def length_penalty_reward(
        prompts: list[str], completions: list[Any], **columns: Any
    ) -> list[float | None]:
        if unit == "token":
            lengths = [
                len(ids) for ids in _column(columns, "completion_ids", len(completions), "length_penalty")
            ]
        elif unit == "word":
            lengths = [len(completion_text(c).split()) for c in completions]
        else:
            lengths = [len(completion_text(c)) for c in completions]
        excess = [(n - target) if over_only else abs(n - target) for n in lengths]
        return [-min(1.0, max(0, e) / target) for e in excess]

    return length_penalty_reward


register_reward("length_penalty", length_penalty)

_ANSWER_MARKERS = (
    re.compile(r"<answer>(.*?)</answer>", re.DOTALL),
    re.compile(r"\banswer\s*(?:is|:)\s*(.+)", re.IGNORECASE | re.DOTALL),
)


def chosen_choice(text: str, choices: Sequence[str]) -> str | None:
    """The label among `choices` that `text` commits to, or None when it names none or several.

    Looks in the `<answer>` span or after "answer is"/"answer:" when present, else in the whole text. A text that
    starts with a label chooses it; otherwise exactly one distinct label must occur. Labels match as whole words,
    case-insensitively, except one-character labels (A, B, ...) which match case-sensitively.
    """
    region = text
    for marker in _ANSWER_MARKERS:
        if match := marker.search(text):
            region = match.group(1)
            break
    spans: list[tuple[int, int, str]] = []
    for choice in choices:
        flags = 0 if len(choice) == 1 else re.IGNORECASE
        pattern = re.compile(rf"(?<!\w){re.escape(choice)}(?!\w)", flags)
        spans += [(m.start(), m.end(), choice) for m in pattern.finditer(region)]
    # a label inside a longer one at the same place ("positive" in "very positive") does not count
    spans = [s for s in spans if not any(o[0] <= s[0] and s[1] <= o[1] and o != s for o in spans)]
    if not spans:
        return None
    first = min(spans)
    if not region[: first[0]].strip(" \t\n([{\"'*:"):
        return first[2]
    found = {s[2] for s in spans}
    return found.pop() if len(found) == 1 else None


def choice_correct(choices: list[str] | None = None, column: str = "target") -> Reward:
    """1.0 when the label the completion chooses (see `chosen_choice`) is the target, else 0.0.

    `choices`: the task's labels; without it each record's `choices` field is used. The target is a label or an
    index into the choices.
    """

    def choice_correct_reward(
        prompts: list[str], completions: list[Any], **columns: Any
    ) -> list[float | None]:
        n = len(completions)
        targets = _column(columns, column, n, "choice_correct")
        labels = [choices] * n if choices is not None else _column(columns, "choices", n, "choice_correct")
        scores: list[float | None] = []
        for completion, target, options in zip(completions, targets, labels, strict=True):
            options = [str(o) for o in options]
            expected = (
                options[target] if isinstance(target, int) and not isinstance(target, bool) else str(target)
            )
            scores.append(float(chosen_choice(completion_text(completion), options) == expected))
        return scores

    return choice_correct_reward


register_reward("choice_correct", choice_correct)

KEYWORD_MODES = ("any", "all", "fraction")


def contains_keyword(
    keywords: list[str] | str | None = None,
    column: str | None = None,
    mode: str = "any",
    case_sensitive: bool = False,
) -> Reward:
    """Score keywords found in the completion: `any` (1/0), `all` (1/0) or `fraction` (share found).

    Keywords come from `keywords` or, per record, from the field `column` (a string or a list).
    """
    if (keywords is None) == (column is None):
        raise ValueError("give exactly one of `keywords` (a list) or `column` (a record field holding them)")
    if mode not in KEYWORD_MODES:
        raise ValueError(f"`mode` must be one of {', '.join(KEYWORD_MODES)}, got {mode!r}")
    fixed = [keywords] if isinstance(keywords, str) else keywords

    def contains_keyword_reward(
        prompts: list[str], completions: list[Any], **columns: Any
    ) -> list[float | None]:
        n = len(completions)
        per_record = [fixed] * n if column is None else _column(columns, column, n, "contains_keyword")
        scores: list[float | None] = []
        for completion, words in zip(completions, per_record, strict=True):
            words = [words] if isinstance(words, str) else list(words or [])
            text = completion_text(completion) if case_sensitive else completion_text(completion).lower()
            hits = [(w if case_sensitive else w.lower()) in text for w in words]
            if not hits:
                scores.append(None)
            elif mode == "fraction":
                scores.append(sum(hits) / len(hits))
            else:
                scores.append(float(any(hits) if mode == "any" else all(hits)))
        return scores

    return contains_keyword_reward


register_reward("contains_keyword", contains_keyword)


def judge(judge: dict[str, Any] | str, against: str | None = None, base_dir: str | Path = ".") -> Reward:
    """A judge model's verdict as the reward (honellm.evaluation.judges): pointwise, its rating in [0, 1];
    pairwise, P(the completion is better than the record's `against` field, default the task's target).

    `judge` is a JudgeConfig block (`{model: ..., mode: ..., calibration: pairs.jsonl, ...}`). The model loads, and
    the judge is calibrated on its `calibration` pairs and refused below its bars, on the first call, not when the
    task loads.
    """
    from honellm.evaluation.judges import calibrated_judge, judge_config

    config = judge_config(judge, where="rewards: judge")
    if config.mode == "pairwise" and against is None:
        against = "target"
    loaded: dict[str, Any] = {}

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        if "judge" not in loaded:
            loaded["judge"], loaded["calibration"] = calibrated_judge(config, base_dir=base_dir)
            reward.calibration = loaded["calibration"]
        found = loaded["judge"]
        texts = [completion_text(c) for c in completions]
        requests = [completion_text(p) for p in prompts]
        if config.mode == "pointwise":
            return [float(v) for v in found.score(requests, texts)]
        references = _column(columns, against, len(texts), "judge")
        return [float(v) for v in found.prefer(requests, texts, [str(r) for r in references])]

    reward.calibration = None
    return reward


register_reward("judge", judge)


# ---------------------------------------------------------------------------------------------------------------
# User rewards from a Python file


def load_python_reward(reference: str, base_dir: str | Path = ".", where: str = "rewards") -> Reward:
    """Import `file.py:function` (the file relative to `base_dir`, the task YAML's folder) and check its signature.

    The file is imported once per process, only when a spec names it (`honellm.plugins`). The function must take
    `(prompts, completions, **kwargs)`.
    """
    function, label = import_function(reference, base_dir, where, kind="reward")
    _check_reward_signature(function, label, where)
    return function


def _check_reward_signature(function: Callable, label: str, where: str) -> None:
    """Rewards are called by keyword, as TRL calls them: `f(prompts=..., completions=..., **columns)`.

    So the function needs `**kwargs` (for the fields it does not use) and a `completions` parameter; other named
    parameters (`answer`, ...) are record fields. Positional-only parameters cannot be passed by name.
    """
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return  # builtins and C callables: trust them
    kinds = {p.kind for p in parameters.values()}
    positional_only = [p for p in parameters.values() if p.kind == p.POSITIONAL_ONLY and p.default is p.empty]
    if inspect.Parameter.VAR_KEYWORD not in kinds or "completions" not in parameters or positional_only:
        raise HoneError(
            f"reward {label} has the signature {inspect.signature(function)}",
            where=where,
            fix="define it as `def name(prompts, completions, **kwargs) -> list[float]`; arguments arrive by name, "
            "and record fields arrive by name too, as lists aligned with completions (TRL's convention)",
        )


# ---------------------------------------------------------------------------------------------------------------
# Several rewards, weighted


@dataclass(frozen=True)
class RewardScores:
    """Per-function scores (NaN where a function returned None) and the weighted total per completion.

    A total is the weighted sum over the functions that scored the completion; NaN if none did (as TRL).
    """

    per_function: dict[str, list[float]]
    total: list[float]


class CombinedReward:
    """Named reward functions with weights; calling it returns the weighted totals, so it is a reward itself."""

    def __init__(self, names: list[str], functions: list[Reward], weights: list[float]):
        if not (len(names) == len(functions) == len(weights)) or len(set(names)) != len(names):
            raise ValueError("names, functions and weights must align and names be unique")
        self.names, self.functions, self.weights = list(names), list(functions), list(weights)

    def score(self, prompts: list[str], completions: list[Any], **columns: Any) -> RewardScores:
        n = len(completions)
        per_function: dict[str, list[float]] = {}
        for name, function in zip(self.names, self.functions, strict=True):
            scores = function(prompts=prompts, completions=completions, **columns)
            per_function[name] = _checked_scores(scores, n, name)
        total = []
        for i in range(n):
            scored = [(w, per_function[name][i]) for name, w in zip(self.names, self.weights, strict=True)]
            scored = [(w, s) for w, s in scored if not math.isnan(s)]
            total.append(sum(w * s for w, s in scored) if scored else math.nan)
        return RewardScores(per_function, total)

    def __call__(self, prompts: list[str], completions: list[Any], **columns: Any) -> list[float]:
        return self.score(prompts, completions, **columns).total

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}*{w:g}" for n, w in zip(self.names, self.weights, strict=True))
        return f"CombinedReward({parts})"


def _checked_scores(scores: Any, n: int, name: str) -> list[float]:
    """Scores as floats (None -> NaN), or a `HoneError` naming the reward that returned something else."""
    fix = "return a list with one float (or None) per completion"
    if not isinstance(scores, Sequence) or isinstance(scores, str) or len(scores) != n:
        size = len(scores) if isinstance(scores, Sequence) else type(scores).__name__
        raise HoneError(f"reward {name!r} returned {size} for {n} completions", where="rewards", fix=fix)
    out = []
    for score in scores:
        if score is None:
            out.append(math.nan)
        elif isinstance(score, int | float) or hasattr(score, "__float__"):
            out.append(float(score))
        else:
            raise HoneError(f"reward {name!r} returned {score!r}, not a number", where="rewards", fix=fix)
    return out


def build_reward(specs: Sequence[dict[str, Any] | str], base_dir: str | Path = ".") -> CombinedReward:
    """Build the task's rewards from specs: `{name: ..., weight: ..., **params}` or `{python: file:fn, weight: ...}`.

    A bare string is a built-in's name. `base_dir` is the task YAML's folder (user files are relative to it).
    Every problem is a `HoneError` that names the spec (`rewards[i]`).
    """
    if not specs:
        raise HoneError(
            "no reward functions given",
            where="rewards",
            fix="add rewards to the task, e.g. `rewards: [{name: exact_match}]`",
        )
    names: list[str] = []
    functions: list[Reward] = []
    weights: list[float] = []
    for i, spec in enumerate(specs):
        where = f"rewards[{i}]"
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        weight = spec.pop("weight", 1.0)
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            raise HoneError(f"weight {weight!r} is not a number", where=where, fix="write e.g. `weight: 0.5`")
        if ("name" in spec) == ("python" in spec):
            raise HoneError(
                "a reward spec needs exactly one of `name` (a built-in) or `python` (file.py:function)",
                where=where,
                fix=f"built-ins: {', '.join(sorted(REWARD_FUNCTIONS))}",
            )
        if "python" in spec:
            reference = str(spec.pop("python"))
            if spec:
                raise HoneError(
                    f"unknown keys for a python reward: {', '.join(sorted(spec))}",
                    where=where,
                    fix="a python reward takes only `python` and `weight`; read other settings inside the function",
                )
            function = load_python_reward(reference, base_dir, where)
            label = reference.rpartition(":")[2]
        else:
            label = str(spec.pop("name"))
            function = _make_builtin(label, spec, where, base_dir)
        name, k = label, 2
        while name in names:
            name, k = f"{label}_{k}", k + 1
        names.append(name)
        functions.append(function)
        weights.append(float(weight))
    return CombinedReward(names, functions, weights)


def _make_builtin(name: str, params: dict[str, Any], where: str, base_dir: str | Path = ".") -> Reward:
    if name not in REWARD_FUNCTIONS:
        close = difflib.get_close_matches(name, REWARD_FUNCTIONS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise HoneError(
            f"unknown reward {name!r}",
            where=where,
            fix=f"{hint}built-ins: {', '.join(sorted(REWARD_FUNCTIONS))}; or `python: file.py:function`",
        )
    factory = REWARD_FUNCTIONS[name]
    signature = inspect.signature(factory)
    if "base_dir" in signature.parameters:  # a factory that reads files named in the task (the judge's pairs)
        params = {**params, "base_dir": base_dir}
    unknown = [key for key in params if key not in signature.parameters]
    if unknown:
        suggestions = [difflib.get_close_matches(key, signature.parameters, n=1) for key in unknown]
        hints = [
            f"{k!r} (did you mean {s[0]!r}?)" if s else repr(k)
            for k, s in zip(unknown, suggestions, strict=True)
        ]
        raise HoneError(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} for reward {name!r}: {', '.join(hints)}",
            where=where,
            fix=f"{name} takes: {', '.join(signature.parameters) or 'no parameters'}",
        )
    try:
        signature.bind(**params)
        return factory(**params)
    except (TypeError, ValueError) as err:
        raise HoneError(f"reward {name!r}: {err}", where=where, fix=f"{name} takes: {signature}") from err


def task_reward(task, *, gold: bool = False) -> CombinedReward:
    """The task's combined reward (its weighted `rewards:`), or with `gold` the `gold_rewards:` the guard watches.

    Built once per task and kept on it; user functions from Python files are imported here, on first use.
    """
    key = "gold_rewards" if gold else "rewards"
    cache = task.__dict__.setdefault("_rewards", {})
    if key not in cache:
        specs = getattr(task.config, key)
        if not specs:
            raise HoneError(f"task {task.name!r} has no {key}", where=task.source,
                            fix=f"add `{key}: [{{name: numeric_match}}]` (or another reward) to the task")
        cache[key] = build_reward(specs, task.base_dir)
    return cache[key]


def check_task_rewards(task) -> None:
    """The task's built-in reward specs are valid (names, parameters); user files are checked when first used."""
    for key in ("rewards", "gold_rewards"):
        builtin = [s for s in getattr(task.config, key) if "python" not in s]
        if builtin:
            try:
                build_reward(builtin, task.base_dir)
            except HoneError as err:
                raise HoneError(err.what, where=f"{task.where(key)} ({key}: {err.where})", fix=err.fix) from None
