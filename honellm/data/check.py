"""`hone data check`: the format found, records per split, token lengths, and every problem in the data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from honellm.data.chat import build_messages, render_answer, render_prompt
from honellm.errors import DataError, HoneError, Problem
from honellm.task import Task, TaskConfig


@dataclass
class LengthStats:
    count: int
    min: int
    mean: float
    p50: int
    p95: int
    max: int

    @classmethod
    def of(cls, values: list[int]) -> LengthStats | None:
        if not values:
            return None
        ordered = sorted(values)

        def pct(q: float) -> int:
            return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

        return cls(len(values), ordered[0], sum(values) / len(values), pct(0.5), pct(0.95), ordered[-1])


@dataclass
class SplitReport:
    name: str
    records: int
    problems: list[Problem] = field(default_factory=list)
    lengths: dict[str, LengthStats | None] = field(default_factory=dict)


@dataclass
class DataReport:
    source: str
    format: str
    kind: str
    model: str
    splits: list[SplitReport]

    @property
    def problems(self) -> list[Problem]:
        return [p for s in self.splits for p in s.problems]


def task_for(file_or_task: str, overrides: list[str] | None = None) -> Task:
    """A task YAML (or built-in task name) as it is, or a bare data file wrapped in a one-split task."""
    path = Path(file_or_task)
    if path.suffix in (".yaml", ".yml") or (not path.exists() and "/" not in file_or_task and "." not in file_or_task):
        return Task.load(file_or_task, overrides, skip_invalid=True)
    if not path.exists():
        raise HoneError("file not found", where=file_or_task, fix="give a data file or a task YAML")
    config = TaskConfig.model_validate({"name": path.stem, "data": {"train": str(path.resolve())}})
    from honellm.config import apply_overrides

    data = apply_overrides(config.model_dump(), overrides or [], TaskConfig)
    return Task.from_config(data, skip_invalid=True)


def check_data(file_or_task: str, *, model: str | None = None, overrides: list[str] | None = None,
               max_token_records: int = 2000) -> DataReport:
    """Validate every split and measure token lengths with the model's tokenizer."""
    task = task_for(file_or_task, overrides)
    model_name = model or task.config.model
    splits = []
    tokenizer = None
    for name in task.available_splits():
        try:
            records = task.split(name)
            problems = task.skipped(name)
        except DataError as err:  # unreadable beyond skipping (should not happen with skip_invalid)
            records, problems = [], err.problems
        report = SplitReport(name, len(records), problems)
        if records:
            if tokenizer is None:
                from honellm.models import load_tokenizer

                tokenizer = load_tokenizer(model_name)
            report.lengths = _lengths(task, records[:max_token_records], tokenizer)
        splits.append(report)
    fmt = task.format
    return DataReport(task.source or file_or_task, fmt, task.kind, model_name, splits)


def _lengths(task: Task, records, tokenizer) -> dict[str, LengthStats | None]:
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    system = task.config.prompt.system
    prompts, answers, rejected = [], [], []
    for record in records:
        if task.kind == "preference":
            pair = task.pair(record)
            messages = build_messages(system, [], pair.prompt)
            prompts.append(count(render_prompt(tokenizer, messages)))
            answers.append(count(render_answer(tokenizer, messages, pair.chosen)))
            rejected.append(count(render_answer(tokenizer, messages, pair.rejected)))
            continue
        messages = build_messages(system, [], task.messages(record))
        prompts.append(count(render_prompt(tokenizer, messages)))
        target = task.target(record)
        if target is not None:
            answers.append(count(render_answer(tokenizer, messages, target)))
    if task.kind == "preference":
        return {"prompt": LengthStats.of(prompts), "chosen": LengthStats.of(answers), "rejected": LengthStats.of(rejected)}
    return {"prompt": LengthStats.of(prompts), "target": LengthStats.of(answers)}
