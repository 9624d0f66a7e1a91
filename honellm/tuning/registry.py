"""The tuning-method registry: one entry per method, registered in one line beside its definition.

The CLI (`hone tune --method NAME`), YAML files and `hone tune --methods` find methods here and nowhere else.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from honellm.errors import HoneError
from honellm.tuning.config import SFTConfig


def save_adapter(model, folder: Path, *, initial: Path | None = None, state_dict: dict | None = None) -> None:
    """Write a PEFT model's adapter in the standard PEFT format (safetensors); `state_dict`: whole weights gathered
    under FSDP (None: the model's own)."""
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)


@dataclass(frozen=True)
class TuningMethod:
    """A way to make a base model trainable for SFT.

    `apply(model, config, base_path)` returns the model to train (a PeftModel, or the model itself for full
    fine-tuning) with exactly the parameters to train marked `requires_grad`. `load`, when set, replaces the
    default loading of the base model (QLoRA loads it quantised). `save(model, folder, initial=...)` writes the
    adapter; `initial_adapter` asks the recipe to save the adapter right after `apply` for it (PiSSA and OLoRA
    change the base weights at init, and their adapter is converted on save so it applies to the original base).
    """

    name: str
    config: type[SFTConfig]
    apply: Callable[..., torch.nn.Module]
    summary: str
    paper: str | None = None
    merges: bool = True  # the adapter can be folded into the base weights (export --format merged)
    trains_base: bool = False  # full fine-tuning: the artifact holds whole weights, not an adapter
    needs_gpu: bool = False
    load: Callable | None = None
    save: Callable[..., None] = save_adapter
    initial_adapter: bool = False


METHODS: dict[str, TuningMethod] = {}


def register_method(method: TuningMethod) -> TuningMethod:
    if method.name in METHODS:
        raise ValueError(f"tuning method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> TuningMethod:
    import honellm.tuning.methods  # noqa: F401 - registers the built-in methods

    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise HoneError(f"unknown tuning method {name!r}", where="--method",
                        fix=f"{hint}methods: {', '.join(METHODS)} (hone tune --methods describes them)")
    return METHODS[name]


def all_methods() -> dict[str, TuningMethod]:
    import honellm.tuning.methods  # noqa: F401

    return dict(METHODS)


def method_config(method: str | None, path: str | Path | None = None, overrides: list[str] | None = None):
    """(method, its validated config) from an optional YAML file and `key=value` overrides.

    The YAML may name the method (`method: lora`); `method` given here wins. Unknown keys are errors that name
    the closest valid key of that method's config.
    """
    from honellm.config import LineMap, apply_overrides, load_yaml, validate

    data, lines = load_yaml(path) if path else ({}, LineMap())
    in_file = data.pop("method", None)
    name = method or in_file
    if name is None:
        raise HoneError("no tuning method given", fix="pass --method NAME (hone tune --methods lists them)")
    spec = get_method(name)
    apply_overrides(data, overrides or [], spec.config)
    return spec, validate(spec.config, data, source=path, lines=lines)
