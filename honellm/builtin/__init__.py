"""Built-in demo tasks, generated deterministically by Hone's own code (no downloaded data).

- `intents`: route a customer message to one of six intents (classification, choices).
- `arithmetic`: short arithmetic word problems with a checkable numeric answer (reward functions, GRPO).
- `support_prefs`: pairs of replies to customer messages, the helpful one preferred (reward models, DPO family).
- `arithmetic_hackable`: `arithmetic` with a deliberately hackable proxy reward, to show the reward-hacking guard.
- `arithmetic_tools`: `arithmetic` with a calculator tool the model may call in multi-turn episodes.
- `arithmetic_tools_sft`: the same problems as demonstrated calculator episodes (chat records), to fine-tune a
  model into calling the tool before GRPO (the cold start).

Task YAMLs for them ship in this folder and are copied to examples/; data paths use `builtin:NAME/SPLIT`.
"""

from __future__ import annotations

from pathlib import Path

from honellm.builtin.generators import GENERATORS, SIZES
from honellm.data.readers import Record
from honellm.errors import HoneError

HERE = Path(__file__).parent
BUILTIN_TASKS = ("intents", "arithmetic", "support_prefs", "arithmetic_hackable", "arithmetic_tools",
                 "arithmetic_tools_sft")
_CACHE: dict[str, list[dict]] = {}


def builtin_task_path(name: str) -> Path | None:
    path = HERE / f"{name}.yaml"
    return path if name in BUILTIN_TASKS and path.exists() else None


def builtin_records(spec: str, where: str = "task") -> list[Record]:
    """Records of `NAME/SPLIT`, generated deterministically (same every run, on every machine)."""
    name, _, split = spec.partition("/")
    if name not in GENERATORS or split not in SIZES[name]:
        valid = ", ".join(f"builtin:{n}/{s}" for n in GENERATORS for s in SIZES[n])
        raise HoneError(f"unknown built-in data {spec!r}", where=where, fix=f"use one of: {valid}")
    if name not in _CACHE:
        _CACHE[name] = GENERATORS[name]()
    records = _CACHE[name]
    start = sum(SIZES[name][s] for s in list(SIZES[name])[: list(SIZES[name]).index(split)])
    part = records[start:start + SIZES[name][split]]
    return [Record(dict(r), f"builtin:{name}/{split}#{i + 1}") for i, r in enumerate(part)]
