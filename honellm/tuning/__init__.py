"""Tuning: parameter-efficient methods (LoRA and family, IA3, prompt learning, LyCORIS) and full fine-tuning,
trained by the SFT recipe into an Artifact.

- `registry.py`: `METHODS`, `register_method`; `catalog.py`: `get_method`, `all_methods`, `method_config`
  (YAML + overrides -> typed config), with every built-in method registered
- `methods.py`: each method's config and `apply`, registered beside its definition
- `targets.py`: which modules an adapter goes into, by architecture
- `sft.py`: the recipe, `tune(task, method, config, out=, resume=, force=) -> Artifact`
"""

from __future__ import annotations

from honellm.tuning.catalog import all_methods, get_method, method_config
from honellm.tuning.config import SFTConfig
from honellm.tuning.registry import METHODS, TuningMethod, register_method

__all__ = ["METHODS", "SFTConfig", "TuningMethod", "all_methods", "get_method", "method_config", "register_method",
           "tune", "tune_task"]


def tune(*args, **kwargs):
    """See `honellm.tuning.sft.tune`."""
    from honellm.tuning.sft import tune as _tune

    return _tune(*args, **kwargs)


def tune_task(task_path: str, method: str | None, overrides: list[str] | None = None, *, config_file: str | None = None,
              out: str | None = None, resume: bool = False, force: bool = False, skip_invalid: bool = False):
    """What `hone tune` does: load the task and the method's config, then run the SFT recipe.

    Overrides whose first key is a task field (`data.train=...`, `model=...`, `prompt.system=...`) change the
    task; all others configure the method (`lr=1e-4 r=8 epochs=2`).
    """
    from honellm.runtime.tasks import load_task
    from honellm.task import TaskConfig

    task_overrides, method_overrides = [], []
    for text in overrides or []:
        key = text.split("=", 1)[0].strip().lstrip("-")
        (task_overrides if key.split(".")[0] in TaskConfig.model_fields else method_overrides).append(text)
    task = load_task(task_path, task_overrides, skip_invalid=skip_invalid)
    spec, config = method_config(method, config_file, method_overrides)
    return tune(task, spec.name, config, out=out, resume=resume, force=force)
