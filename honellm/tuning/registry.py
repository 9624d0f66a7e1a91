"""The tuning-method registry: one entry per method, registered in one line beside its definition.

The CLI (`hone tune --method NAME`), YAML files and `hone tune --methods` find methods here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

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
