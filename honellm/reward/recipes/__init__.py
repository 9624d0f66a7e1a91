"""The align-method registry: every reward-based method `hone align --method NAME` can run, one entry each.

An align method is a config class (pydantic, every field with a default and a description; derive from
`honellm.training.config.TrainingConfig` to share lr/batch_size/max_steps/... with `hone tune`) and a recipe,
a flat function `recipe(task, config, *, out=None, resume=False, force=False) -> Artifact` read top to bottom.

To add a method, write ONE module in this package (`honellm/reward/recipes/<method>.py`) holding its config, its
recipe, and one registration line beside them:

    register_align_method(AlignMethod("grpo", GRPOConfig, grpo, "group-relative policy optimisation",
                                      paper="https://arxiv.org/abs/2402.03300", data=("reference", "sft")))

Nothing else needs editing: the first lookup imports every module of this package (`_import_recipes`), so the
CLI (`hone align --method grpo`, `hone align --methods`), YAML files and the library find it. A name registered
twice is an error.

Built in: `reward_model` (`reward_model.py`), `dpo`, `ipo`, `cdpo`, `kto`, `orpo`, `simpo` (`preference.py`);
what they share (adapter settings, run folder, pair encoding) is in `common.py`.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from honellm.config import Config
from honellm.errors import HoneError


@dataclass(frozen=True)
class AlignMethod:
    """A reward-based method: its config, its recipe, and what data it trains on.

    `recipe(task, config, *, out, resume, force) -> Artifact`. `data` lists the task kinds it accepts
    (`Task.kind`: "preference", "unpaired", "reference", "sft"); the CLI refuses other tasks with a clear error
    before any model is loaded.
    """

    name: str
    config: type[Config]
    recipe: Callable
    summary: str
    paper: str | None = None
    data: tuple[str, ...] = ("preference",)


ALIGN_METHODS: dict[str, AlignMethod] = {}


def register_align_method(method: AlignMethod) -> AlignMethod:
    """Add `method` to the registry (one line beside its definition); a second registration of a name is a bug."""
    if method.name in ALIGN_METHODS:
        raise ValueError(f"align method {method.name!r} registered twice")
    ALIGN_METHODS[method.name] = method
    return method


def _import_recipes() -> None:
    """Import every module of this package, so that each registers its methods."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def all_align_methods() -> dict[str, AlignMethod]:
    _import_recipes()
    return dict(ALIGN_METHODS)


def get_align_method(name: str) -> AlignMethod:
    """The method called `name`, or a HoneError naming the closest one."""
    _import_recipes()
    if name not in ALIGN_METHODS:
        close = difflib.get_close_matches(name, list(ALIGN_METHODS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise HoneError(f"unknown align method {name!r}", where="--method",
                        fix=f"{hint}methods: {', '.join(ALIGN_METHODS)} (hone align --methods describes them)")
    return ALIGN_METHODS[name]


def align_config(method: str | None, path: str | Path | None = None, overrides: list[str] | None = None):
    """(method, its validated config) from an optional YAML file and `key=value` overrides.

    The YAML may name the method (`method: dpo`); `method` given here wins. Unknown keys are errors naming the
    closest valid key of that method's config.
    """
    from honellm.config import LineMap, apply_overrides, load_yaml, validate

    data, lines = load_yaml(path) if path else ({}, LineMap())
    in_file = data.pop("method", None)
    name = method or in_file
    if name is None:
        raise HoneError("no align method given", fix="pass --method NAME (hone align --methods lists them)")
    spec = get_align_method(name)
    apply_overrides(data, overrides or [], spec.config)
    return spec, validate(spec.config, data, source=path, lines=lines)


def align(task, method: str, config: Config | None = None, *, out: str | Path | None = None, resume: bool = False,
          force: bool = False):
    """Run align method `method` on `task` (a loaded `Task`) with `config` (its defaults when None) -> Artifact."""
    spec = get_align_method(method)
    config = config if config is not None else spec.config()
    if not isinstance(config, spec.config):
        raise TypeError(f"method {method!r} takes a {spec.config.__name__}, not a {type(config).__name__}")
    if task.kind not in spec.data:
        raise HoneError(f"{method} trains on {' or '.join(spec.data)} data, but task {task.name!r} has {task.kind} "
                        f"records ({task.format})", where=task.source,
                        fix=_data_fix(spec.data))
    return spec.recipe(task, config, out=out, resume=resume, force=force)


def align_task(task_path: str, method: str | None, overrides: list[str] | None = None, *,
               config_file: str | None = None, out: str | None = None, resume: bool = False, force: bool = False,
               skip_invalid: bool = False):
    """What `hone align` does: load the task and the method's config, then run the method's recipe.

    Overrides whose first key is a task field (`data.train=...`, `model=...`) change the task; all others
    configure the method (`beta=0.1 lr=5e-5 max_steps=100`).
    """
    from honellm.runtime.tasks import load_task
    from honellm.task import TaskConfig

    task_overrides, method_overrides = [], []
    for text in overrides or []:
        key = text.split("=", 1)[0].strip().lstrip("-")
        (task_overrides if key.split(".")[0] in TaskConfig.model_fields else method_overrides).append(text)
    spec, config = align_config(method, config_file, method_overrides)
    task = load_task(task_path, task_overrides, skip_invalid=skip_invalid)
    return align(task, spec.name, config, out=out, resume=resume, force=force)


def _data_fix(kinds: tuple[str, ...]) -> str:
    hints = {"preference": "prompt/chosen/rejected records (or HH-style chosen/rejected transcripts)",
             "unpaired": "prompt/completion/label records",
             "reference": "prompts with a checkable answer and task rewards",
             "sft": "prompt/answer records"}
    return "use a task with " + " or ".join(hints.get(k, k) for k in kinds)


__all__ = ["ALIGN_METHODS", "AlignMethod", "align", "align_config", "align_task", "all_align_methods",
           "get_align_method", "register_align_method"]
