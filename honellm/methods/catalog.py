"""Every method, registered: look one up by name, list a family, read a method's config, run it on a task.

The modules imported below register their methods beside their definitions (`register_method(Method(...))`);
importing them here is what makes a lookup see every built-in method. A new method's module is added to this
list (docs/adding-a-method.md).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from honellm.config import Config, LineMap, apply_overrides, load_yaml, validate
from honellm.errors import HoneError
from honellm.methods.registry import FAMILIES, METHODS, VERBS, Method
from honellm.prompting import methods as _prompting  # noqa: F401 - zero-shot, few-shot, prompt-search
from honellm.reward.recipes import best_of_n as _best_of_n  # noqa: F401
from honellm.reward.recipes import grpo as _grpo  # noqa: F401 - grpo, rloo
from honellm.reward.recipes import judge as _judge  # noqa: F401
from honellm.reward.recipes import online_dpo as _online_dpo  # noqa: F401
from honellm.reward.recipes import ppo as _ppo  # noqa: F401
from honellm.reward.recipes import preference as _preference  # noqa: F401 - dpo, ipo, cdpo, orpo, simpo, kto
from honellm.reward.recipes import reward_model as _reward_model  # noqa: F401
from honellm.reward.recipes import rft as _rft  # noqa: F401
from honellm.runtime.tasks import load_task
from honellm.task import TaskConfig
from honellm.tuning import sft as _tuning  # noqa: F401 - every PEFT method and full fine-tuning

KINDS = {"prompting": "prompting", "tuning": "tuning", "reward": "align"}  # what the errors call each family
__all__ = ["FAMILIES", "METHODS", "Method", "all_methods", "get_method", "method_config", "run_method",
           "split_overrides"]


def all_methods(family: str | None = None) -> dict[str, Method]:
    """The registered methods (of one family), in registration order."""
    return {name: m for name, m in METHODS.items() if family is None or m.family == family}


def get_method(name: str, family: str | None = None) -> Method:
    """The method called `name` (of `family`, when given), or a HoneError naming the closest one."""
    methods = all_methods(family)
    if name not in methods:
        kind = KINDS.get(family or "", "")
        close = difflib.get_close_matches(name, list(methods), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listing = f"{VERBS[family]} --methods" if family else "hone compare --help"
        elsewhere = METHODS.get(name)
        if elsewhere is not None:  # a method of another family: say which verb runs it
            hint = f"{name} is a {elsewhere.family} method: run it with {VERBS[elsewhere.family]}. "
        raise HoneError(f"unknown {kind + ' ' if kind else ''}method {name!r}", where="--method",
                        fix=f"{hint}methods: {', '.join(methods)} ({listing} describes them)")
    return methods[name]


def method_config(method: str | None, path: str | Path | None = None, overrides: list[str] | None = None, *,
                  family: str | None = None) -> tuple[Method, Config]:
    """(method, its validated config) from an optional YAML file and `key=value` overrides.

    The YAML may name the method (`method: lora`); `method` given here wins. Unknown keys are errors naming the
    closest valid key of that method's config.
    """
    data, lines = load_yaml(path) if path else ({}, LineMap())
    in_file = data.pop("method", None)
    name = method or in_file
    if name is None:
        raise HoneError(f"no {KINDS.get(family or '', '')} method given".replace("  ", " "),
                        fix=f"pass --method NAME ({VERBS.get(family or '', 'hone')} --methods lists them)")
    spec = get_method(name, family)
    apply_overrides(data, overrides or [], spec.config)
    return spec, validate(spec.config, data, source=path, lines=lines)


def split_overrides(overrides: list[str] | None) -> tuple[list[str], list[str]]:
    """(task overrides, method overrides): a `key=value` whose first key is a task field (`data.train=...`,
    `model=...`, `prompt.system=...`) changes the task; all others configure the method (`lr=1e-4 r=8`)."""
    task_overrides, method_overrides = [], []
    for text in overrides or []:
        key = text.split("=", 1)[0].strip().lstrip("-")
        (task_overrides if key.split(".")[0] in TaskConfig.model_fields else method_overrides).append(text)
    return task_overrides, method_overrides


def run_method(task, method: str | Method, config: Config | None = None, *, out: str | Path | None = None,
               resume: bool = False, force: bool = False, family: str | None = None):
    """Run `method` on `task` (a loaded Task) with `config` (its defaults when None) -> Artifact.

    A task without the data the method needs is refused here, with what is missing and how to get it, before any
    model is loaded.
    """
    spec = method if isinstance(method, Method) else get_method(method, family)
    config = config if config is not None else spec.config()
    if not isinstance(config, spec.config):
        raise TypeError(f"method {spec.name!r} takes a {spec.config.__name__}, not a {type(config).__name__}")
    missing = spec.missing(task, config)
    if missing is not None:
        raise HoneError(missing[0], where=task.source, fix=missing[1])
    return spec.run(task, config, out=out, resume=resume, force=force)


def run_task(task_path: str, method: str | None, overrides: list[str] | None = None, *, family: str,
             config_file: str | None = None, out: str | None = None, resume: bool = False, force: bool = False,
             skip_invalid: bool = False):
    """What `hone tune` and `hone align` do: split the overrides, read the method's config, load the task, run."""
    task_overrides, method_overrides = split_overrides(overrides)
    spec, config = method_config(method, config_file, method_overrides, family=family)
    task = load_task(task_path, task_overrides, skip_invalid=skip_invalid)
    return run_method(task, spec, config, out=out, resume=resume, force=force)
