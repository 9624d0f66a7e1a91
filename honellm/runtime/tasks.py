"""Loading a task for a command: read it, then check the names it gives against the registries that own them.

`Task` (honellm/task.py) sits at the bottom of the layers and knows no metric or reward function; the metric and
reward registries sit above it. `load_task` is `Task.load` plus those checks, so a misspelt metric or reward is
reported when the task loads, with the closest name, before any model is loaded.
"""

from __future__ import annotations

import difflib

from honellm.errors import HoneError
from honellm.evaluation.metrics import METRICS
from honellm.reward.functions import check_task_rewards
from honellm.task import Task


def load_task(source, overrides: list[str] | None = None, *, skip_invalid: bool = False) -> Task:
    """A task from a YAML path or built-in name (or a Task, returned as it is), with its names checked."""
    if isinstance(source, Task):
        return source
    return check_task(Task.load(source, overrides or [], skip_invalid=skip_invalid))


def check_task(task: Task) -> Task:
    """Raise a HoneError naming the task file and line when its metric or a built-in reward is unknown."""
    if task.config.metric != "auto" and task.config.metric not in METRICS:
        close = difflib.get_close_matches(task.config.metric, list(METRICS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise HoneError(f"unknown metric {task.config.metric!r}", where=task.where("metric"),
                        fix=f"{hint}metrics: {', '.join(METRICS)}")
    check_task_rewards(task)
    return task
