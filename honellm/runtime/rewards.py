"""The reward an answer gets: reward functions and/or a reward model, weighted (`RewardSource`).

What best-of-n applies at inference (honellm.runtime.best_of_n) and what online RL trains on
(honellm.reward.rollout, honellm.reward.recipes.*): one scorer for both, so an artifact is served with the reward it
was scored with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from honellm.errors import HoneError
from honellm.reward.reward_model import load_reward_model


@dataclass
class RewardScores:
    """Per-source scores (NaN where a source could not score) and the weighted total per completion."""

    per_function: dict[str, list[float]]
    total: list[float]

    def total_tensor(self) -> torch.Tensor:
        return torch.tensor(self.total, dtype=torch.float32)


class RewardSource:
    """A reward on completions: the task's reward functions (weighted), a reward model (weighted), or both.

    Reward functions get the record's fields, `target` and `completion_ids` as columns (the convention of
    `honellm.reward.functions`); the reward model gets the prompt messages and the completion text.
    """

    def __init__(self, functions=None, reward_model=None, reward_model_weight: float = 1.0,
                 model_name: str = "reward_model"):
        if functions is None and reward_model is None:
            raise ValueError("a RewardSource needs reward functions or a reward model")
        self.functions = functions
        self.reward_model = reward_model
        self.reward_model_weight = reward_model_weight
        self.model_name = model_name

    @property
    def names(self) -> list[str]:
        names = list(self.functions.names) if self.functions is not None else []
        return names + ([self.model_name] if self.reward_model is not None else [])

    def score(self, task, records: Sequence, messages: Sequence[list[dict]], prompt_texts: Sequence[str],
              completions: Sequence[str], completion_ids: Sequence[list[int]] | None = None) -> RewardScores:
        n = len(completions)
        per_function: dict[str, list[float]] = {}
        weighted: list[list[tuple[float, float]]] = [[] for _ in range(n)]
        if self.functions is not None:
            keys = sorted({k for r in records for k in r})
            columns: dict[str, Any] = {k: [r.get(k) for r in records] for k in keys}
            columns["target"] = [task.target(r) for r in records]
            if completion_ids is not None:
                columns["completion_ids"] = [list(ids) for ids in completion_ids]
            found = self.functions.score(list(prompt_texts), list(completions), **columns)
            per_function.update(found.per_function)
            for name, weight in zip(self.functions.names, self.functions.weights, strict=True):
                for i, value in enumerate(found.per_function[name]):
                    if not math.isnan(value):
                        weighted[i].append((weight, value))
        if self.reward_model is not None:
            values = [float(v) for v in self.reward_model.score([list(m) for m in messages], list(completions))]
            per_function[self.model_name] = values
            for i, value in enumerate(values):
                weighted[i].append((self.reward_model_weight, value))
        total = [sum(w * v for w, v in parts) if parts else math.nan for parts in weighted]
        return RewardScores(per_function, total)

    def score_rollouts(self, task, rollouts) -> RewardScores:
        """`score` on an online-RL rollout (`honellm.reward.rollout.Rollouts`): each completion with its prompt."""
        p = rollouts.prompts
        return self.score(task, rollouts.per_completion(p.records), rollouts.per_completion(p.messages),
                          rollouts.per_completion(p.texts), rollouts.texts, rollouts.content_ids())


def load_reward_model_artifact(path: str, *, where: str):
    """A reward model from an artifact folder (`honellm.reward.reward_model`)."""
    if not Path(path).exists():
        raise HoneError(f"reward model {path!r} not found", where=where,
                        fix="pass the artifact folder of a reward model (`hone align TASK reward_model`)")
    return load_reward_model(path)
