"""Each method's search space: the few settings that matter most, keyed by method name.

A space is a list of parameters (`Float`, `Int`, `Choice`); `suggest(trial, space)` asks an Optuna trial for
one value of each. The table is plain data so that a method registry can take it over (one entry per method)
and `docs/search.md` can print it. A method without an entry cannot be searched (a clear error names those
that can).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Float:
    name: str
    low: float
    high: float
    log: bool = False

    def suggest(self, trial) -> float:
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class Int:
    name: str
    low: int
    high: int
    log: bool = False

    def suggest(self, trial) -> int:
        return trial.suggest_int(self.name, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class Choice:
    name: str
    choices: tuple

    def suggest(self, trial) -> Any:
        return trial.suggest_categorical(self.name, list(self.choices))


Param = Float | Int | Choice

_LORA = [Float("lr", 3e-5, 3e-3, log=True), Choice("r", (4, 8, 16, 32)), Choice("epochs", (1, 2, 3))]
_PREFERENCE = [Float("beta", 0.02, 0.5, log=True), Float("lr", 5e-6, 5e-4, log=True)]

SPACES: dict[str, list[Param]] = {
    # parameter-efficient tuning (honellm.tuning)
    "lora": _LORA,
    "rslora": _LORA,
    "dora": _LORA,
    "pissa": _LORA,
    "olora": _LORA,
    "ia3": [Float("lr", 1e-4, 3e-2, log=True)],
    "prompt_tuning": [Float("lr", 1e-3, 1e-1, log=True), Choice("num_virtual_tokens", (8, 16, 32))],
    "prefix_tuning": [Float("lr", 1e-3, 1e-1, log=True), Choice("num_virtual_tokens", (8, 16, 32))],
    "p_tuning": [Float("lr", 1e-3, 1e-1, log=True), Choice("num_virtual_tokens", (8, 16, 32))],
    # offline preference optimisation (honellm.reward.recipes.preference)
    "dpo": _PREFERENCE,
    "ipo": _PREFERENCE,
    "cdpo": _PREFERENCE,
    "kto": _PREFERENCE,
    "orpo": _PREFERENCE,
    "simpo": [Float("beta", 1.0, 4.0), Float("lr", 5e-6, 5e-4, log=True)],
    # online RL (honellm.reward.recipes.grpo)
    "grpo": [Float("lr", 1e-6, 1e-4, log=True), Float("kl_coef", 0.0, 0.1), Choice("group_size", (4, 8, 16))],
    # prompting (honellm.prompting.search varies the same things: shots, selector, calibration)
    "prompt-search": [Choice("shots", (0, 2, 4, 8)), Choice("selector", ("random", "balanced", "bm25")),
                      Choice("calibration", ("none", "content_free", "batch"))],
}


def space_for(method: str) -> list[Param]:
    from honellm.errors import HoneError

    if method not in SPACES:
        raise HoneError(f"method {method!r} has no search space", where="--search",
                        fix=f"searchable methods: {', '.join(SPACES)}; or run it without --search")
    return SPACES[method]


def suggest(trial, space: list[Param]) -> dict[str, Any]:
    """One value per parameter of `space`, asked of the Optuna `trial`."""
    return {p.name: p.suggest(trial) for p in space}
