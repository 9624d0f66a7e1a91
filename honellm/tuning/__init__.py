"""Tuning: parameter-efficient methods (LoRA and family, IA3, prompt learning, LyCORIS) and full fine-tuning,
trained by the SFT recipe into an Artifact.

- `registry.py`: the PEFT adapter table (`METHODS`, `register_method`); `catalog.py`: `get_method`, `all_methods`
  with every built-in adapter registered (the align recipes attach adapters from it too)
- `methods.py`: each method's config and `apply`, registered beside its definition
- `targets.py`: which modules an adapter goes into, by architecture
- `sft.py`: the recipe, `tune(task, method, config, out=, resume=, force=) -> Artifact`; it registers every
  adapter as a tuning method in the one registry of methods (`honellm.methods`)
"""

from __future__ import annotations

from honellm.tuning.catalog import all_methods, get_method
from honellm.tuning.config import SFTConfig
from honellm.tuning.registry import METHODS, TuningMethod, register_method

__all__ = ["METHODS", "SFTConfig", "TuningMethod", "all_methods", "get_method", "register_method",
           "tune", "tune_task"]


def tune(*args, **kwargs):
    """See `honellm.tuning.sft.tune`."""
    from honellm.tuning.sft import tune as _tune

    return _tune(*args, **kwargs)


def tune_task(task_path: str, method: str | None, overrides: list[str] | None = None, **options):
    """What `hone tune` does (`honellm.methods.catalog.run_task` for the tuning family): split the overrides into
    task fields and method settings, read the method's config, load the task, run the SFT recipe -> Artifact."""
    from honellm.methods.catalog import run_task

    return run_task(task_path, method, overrides, family="tuning", **options)
