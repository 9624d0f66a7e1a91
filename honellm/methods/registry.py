"""One registry of methods for all three families: prompting, tuning and reward-based.

Each method declares, once, beside its definition:

- `name` and `family` ("prompting", "tuning" or "reward": `hone prompt`, `hone tune`, `hone align`),
- `config`: a typed pydantic config (`honellm.config.Config`: every field has a default and a description;
  unknown keys are errors that name the closest valid key),
- `needs`: the data it needs, from `NEEDS` (labels, answers, references, pairs, feedback, rewards, train split),
- `run(task, config, *, out=None, resume=False, force=False) -> Artifact`: one function, read top to bottom,
- `summary` and `paper` for `--methods`, the report and the docs.

    register_method(Method("grpo", "reward", GRPOConfig, grpo, "group relative policy optimisation ...",
                           paper="https://arxiv.org/abs/2402.03300", needs=("references", "rewards")))

A name registered twice is an error. `honellm.methods.catalog` imports every module that registers methods and
looks them up; the CLI verbs, compare, the report and the docs read the table there and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from honellm.config import Config
from honellm.reward.rollout import metric_reward

FAMILIES = ("prompting", "tuning", "reward")  # simplest first: compare's tie-break and the report's order
VERBS = {"prompting": "hone prompt", "tuning": "hone tune", "reward": "hone align"}


def _has_rewards(task) -> bool:
    """The task's `rewards:`, or its metric as a reward when the metric reads generated answers."""
    return bool(task.config.rewards) or metric_reward(task) is not None


@dataclass(frozen=True)
class Need:
    """One kind of data a method needs: how to tell a task has it, what it is, and how to get it. A need about the
    records themselves lists the task kinds (`Task.kind`) that have it."""

    what: str
    fix: str
    kinds: tuple[str, ...] = ()
    check: Callable[[Any], bool] | None = None  # for needs that are not a kind of record

    def met(self, task) -> bool:
        return task.kind in self.kinds if self.kinds else bool(self.check(task))


NEEDS: dict[str, Need] = {
    "answers": Need("records with answers", "use a task with prompt/answer records",
                    kinds=("sft", "reference", "preference")),
    "references": Need("prompts with a checkable answer",
                       "use a task with prompts with a checkable answer and task rewards", kinds=("reference", "sft")),
    "pairs": Need("preference data",
                  "use a task with prompt/chosen/rejected records (or HH-style chosen/rejected transcripts)",
                  kinds=("preference",)),
    "feedback": Need("preference or unpaired data",
                     "use a task with prompt/chosen/rejected records (or HH-style chosen/rejected transcripts) or "
                     "prompt/completion/label records", kinds=("preference", "unpaired")),
    "labels": Need("label choices", "add `choices: [...]` to the task", check=lambda t: bool(t.config.choices)),
    "rewards": Need("a reward", "add `rewards: [{name: numeric_match}]` (or another reward) to the task, or use a "
                                "metric that checks generated answers", check=_has_rewards),
    "train": Need("a train split", "add data.train (or data.file with data.split)",
                  check=lambda t: t.has_split("train")),
    "validation": Need("a validation split", "add data.validation (or data.file with data.split)",
                       check=lambda t: t.has_split("validation")),
}


@dataclass(frozen=True)
class Method:
    """A method: its family, typed config, the data it needs, and the one function that runs it into an Artifact."""

    name: str
    family: str
    config: type[Config]
    run: Callable[..., Any]  # run(task, config, *, out=None, resume=False, force=False) -> Artifact
    summary: str
    paper: str | None = None
    needs: tuple[str, ...] = ()
    shared: type[Config] | None = None  # the family's shared settings (listed once by `--methods`)
    details: Any = None  # what only its family reads (a tuning method's PEFT adapter spec)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name!r}: family must be one of {FAMILIES}")
        unknown = [n for n in self.needs if n not in NEEDS]
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown needs {unknown}; known: {', '.join(NEEDS)}")

    @property
    def data(self) -> tuple[str, ...]:
        """The task kinds it trains on (from its first need about the records), as `--methods` lists them."""
        return next((NEEDS[n].kinds for n in self.needs if NEEDS[n].kinds), ())

    def missing(self, task, config: Config | None = None) -> tuple[str, str] | None:
        """(what is missing, how to fix it) when `task` lacks data this method needs; None when it has all.

        A config that names its own reward model (`reward_model=ARTIFACT`) brings the reward with it."""
        for name in self.needs:
            need = NEEDS[name]
            if name == "rewards" and getattr(config, "reward_model", None):
                continue
            if not need.met(task):
                if need.kinds:
                    return (f"{self.name} trains on {need.what}, but task {task.name!r} has {task.kind} records "
                            f"({task.format})", need.fix)
                return f"{self.name} needs {need.what}, and task {task.name!r} has none", need.fix
        return None


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add `method` to the registry (one line beside its definition); a second registration of a name is a bug."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method
