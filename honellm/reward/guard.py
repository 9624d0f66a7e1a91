"""Reward-hacking guard: watches held-out signals during online RL and raises alarms when the policy games the reward.

Every `GuardConfig.every` steps the recipe generates on held-out prompts and calls
`guard.observe(step, proxy_reward, gold=..., kl=..., mean_length=..., distinct_n=..., entropy=...)`. The guard
keeps the history and returns the alarms that *start* at this observation (an alarm fires once when its condition
begins to hold, and again only after it has cleared):

- `proxy_gold_divergence`: the proxy (the trained reward) rises while the gold metric (the task's metric on the
  held-out set) is flat or falling: Goodhart's law, the overoptimisation Gao et al. measure
  (https://arxiv.org/abs/2210.10760). Two triggers: the trends over the last `window` observations (Theil-Sen
  slopes, robust to a noisy point) or the gold level falling `gold_drop` below its best while the proxy has kept
  rising since then;
- `kl_budget`: the KL to the reference passed `kl_budget`;
- `length_drift`: the mean completion length moved outside `[min_length_ratio, max_length_ratio]` times its start;
- `repetition`: distinct-n fell below `min_distinct_ratio` times its start (the policy repeats itself);
- `entropy_collapse`: the mean token entropy fell below `min_entropy_ratio` times its start (or `entropy_floor`).

Levels ("current", "start") are medians of `smooth` observations, so one noisy evaluation does not fire an alarm.
`best_step` is the step with the best gold value (the proxy's when no gold was given): the checkpoint to keep.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

ALARM_KINDS = ("proxy_gold_divergence", "kl_budget", "length_drift", "repetition", "entropy_collapse")


class GuardConfig(BaseModel):
    """Thresholds of the reward-hacking guard. `None` turns a check off."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(50, ge=1, description="Run the held-out check every this many optimizer steps.")
    window: int = Field(
        5, ge=3, description="Observations over which the proxy and gold trends are estimated."
    )
    smooth: int = Field(
        2,
        ge=1,
        description="Observations whose median is a signal's current (or starting) level; damps noise.",
    )
    proxy_min_rise: float = Field(
        0.05, ge=0, description="Rise of the proxy reward over the window (its units) that counts as rising."
    )
    gold_tolerance: float = Field(
        0.01,
        description="Rise of the gold metric over the window (its units) at or below which gold counts as flat; "
        "a little above 0 so that a plateau with noise counts as flat.",
    )
    gold_drop: float | None = Field(
        0.05,
        gt=0,
        description="Fall of the gold level below its best that alarms while the proxy keeps rising.",
    )
    kl_budget: float | None = Field(
        10.0,
        gt=0,
        description="Largest KL to the reference allowed, in the units the recipe reports (nats per sequence).",
    )
    max_length_ratio: float | None = Field(
        2.0, gt=1, description="Alarm when the mean completion length grows past this multiple of its start."
    )
    min_length_ratio: float | None = Field(
        0.5,
        gt=0,
        lt=1,
        description="Alarm when the mean completion length shrinks below this multiple of its start.",
    )
    min_distinct_ratio: float | None = Field(
        0.7,
        gt=0,
        lt=1,
        description="Alarm when distinct-n falls below this multiple of its start (repetition).",
    )
    min_entropy_ratio: float | None = Field(
        0.3,
        gt=0,
        lt=1,
        description="Alarm when the mean token entropy falls below this multiple of its start.",
    )
    entropy_floor: float | None = Field(
        None,
        ge=0,
        description="Alarm when the mean token entropy (nats) falls below this, whatever its start.",
    )
    action: Literal["warn", "stop"] = Field(
        "warn", description="What the recipe does on an alarm: log a warning, or stop and keep `best_step`."
    )


@dataclass(frozen=True)
class Observation:
    """The held-out signals at one step; `None` where the recipe did not measure one."""

    step: int
    proxy_reward: float
    gold: float | None = None
    kl: float | None = None
    mean_length: float | None = None
    distinct_n: float | None = None
    entropy: float | None = None


@dataclass(frozen=True)
class Alarm:
    """One detected problem: its kind (one of `ALARM_KINDS`), the step, a sentence, and the numbers behind it."""

    kind: str
    step: int
    message: str
    values: dict[str, float] = field(default_factory=dict)


def theil_sen_rise(values: Sequence[float]) -> float:
    """The change across `values` on a robust straight line: the median pairwise slope times the span.

    Theil-Sen (https://en.wikipedia.org/wiki/Theil%E2%80%93Sen_estimator): one outlier does not move it.
    """
    slopes = [
        (values[j] - values[i]) / (j - i) for i in range(len(values)) for j in range(i + 1, len(values))
    ]
    return statistics.median(slopes) * (len(values) - 1) if slopes else 0.0


class RewardHackingGuard:
    """Tracks held-out signals during online RL; `observe` returns the alarms that start at that step."""

    def __init__(self, config: GuardConfig | None = None):
        self.config = config or GuardConfig()
        self.history: list[Observation] = []
        self.alarms: list[Alarm] = []
        self._active: set[str] = set()

    def observe(
        self,
        step: int,
        proxy_reward: float,
        gold: float | None = None,
        *,
        kl: float | None = None,
        mean_length: float | None = None,
        distinct_n: float | None = None,
        entropy: float | None = None,
    ) -> list[Alarm]:
        """Record one held-out check and return the alarms that begin here (empty when all is well)."""
        self.history.append(Observation(step, proxy_reward, gold, kl, mean_length, distinct_n, entropy))
        found = [
            alarm
            for alarm in (
                self._divergence(),
                self._kl(),
                self._length(),
                self._repetition(),
                self._entropy(),
            )
            if alarm is not None
        ]
        new = [alarm for alarm in found if alarm.kind not in self._active]
        self._active = {alarm.kind for alarm in found}
        self.alarms += new
        return new

    @property
    def should_stop(self) -> bool:
        """True once any alarm fired under `action: stop`."""
        return self.config.action == "stop" and bool(self.alarms)

    @property
    def best_step(self) -> int | None:
        """The step with the highest gold value, or the highest proxy reward when no gold was observed."""
        with_gold = [o for o in self.history if o.gold is not None]
        if with_gold:
            return max(with_gold, key=lambda o: o.gold).step  # type: ignore[arg-type, return-value]
        return max(self.history, key=lambda o: o.proxy_reward).step if self.history else None

    def summary(self) -> dict:
        """What a run's manifest records: the best step, the alarms and the history (plain JSON types)."""
        return {
            "best_step": self.best_step,
            "alarms": [asdict(a) for a in self.alarms],
            "history": [asdict(o) for o in self.history],
        }

    # -- the checks -------------------------------------------------------------------------------------------------

    def _series(self, name: str) -> list[tuple[int, float]]:
        return [(o.step, getattr(o, name)) for o in self.history if getattr(o, name) is not None]

    def _level(self, values: Sequence[float]) -> float:
        return statistics.median(values[-self.config.smooth :])

    def _drift(self, name: str) -> tuple[float, float] | None:
        """(start level, current level) of a signal once it has more than `smooth` observations."""
        values = [v for _, v in self._series(name)]
        if len(values) <= self.config.smooth:
            return None
        return statistics.median(values[: self.config.smooth]), self._level(values)

    def _divergence(self) -> Alarm | None:
        c, step = self.config, self.history[-1].step
        pairs = [(o.proxy_reward, o.gold) for o in self.history if o.gold is not None]
        if len(pairs) < c.window:
            return None
        proxy, gold = [p for p, _ in pairs], [g for _, g in pairs]  # type: ignore[misc]
        proxy_rise, gold_rise = theil_sen_rise(proxy[-c.window :]), theil_sen_rise(gold[-c.window :])
        values = {"proxy_rise": proxy_rise, "gold_rise": gold_rise}
        if proxy_rise > c.proxy_min_rise and gold_rise <= c.gold_tolerance:
            return Alarm(
                "proxy_gold_divergence",
                step,
                f"the proxy reward rose by {proxy_rise:.3g} over the last {c.window} checks while the gold metric "
                f"changed by {gold_rise:+.3g}: the policy is likely exploiting the reward",
                values,
            )
        if c.gold_drop is not None:
            levels = [self._level(gold[: i + 1]) for i in range(len(gold))]
            best = max(range(len(levels)), key=levels.__getitem__)
            proxy_then, proxy_now = self._level(proxy[: best + 1]), self._level(proxy)
            drop = levels[best] - levels[-1]
            if drop > c.gold_drop and proxy_now - proxy_then > c.proxy_min_rise:
                values |= {"gold_best": levels[best], "gold_now": levels[-1], "proxy_then": proxy_then}
                values |= {"proxy_now": proxy_now}
                return Alarm(
                    "proxy_gold_divergence",
                    step,
                    f"the gold metric fell from {levels[best]:.3g} to {levels[-1]:.3g} while the proxy reward rose "
                    f"from {proxy_then:.3g} to {proxy_now:.3g}: the policy is likely exploiting the reward",
                    values,
                )
        return None

    def _kl(self) -> Alarm | None:
        latest = self.history[-1]
        budget = self.config.kl_budget
        if budget is None or latest.kl is None or latest.kl <= budget:
            return None
        return Alarm(
            "kl_budget",
            latest.step,
            f"KL to the reference is {latest.kl:.3g}, past the budget of {budget:g}",
            {"kl": latest.kl, "budget": budget},
        )

    def _length(self) -> Alarm | None:
        c, drift = self.config, self._drift("mean_length")
        if drift is None or drift[0] <= 0:
            return None
        start, now = drift
        ratio = now / start
        grew = c.max_length_ratio is not None and ratio > c.max_length_ratio
        shrank = c.min_length_ratio is not None and ratio < c.min_length_ratio
        if not (grew or shrank):
            return None
        return Alarm(
            "length_drift",
            self.history[-1].step,
            f"mean completion length went from {start:.4g} to {now:.4g} ({ratio:.2f}x its start)",
            {"start": start, "now": now, "ratio": ratio},
        )

    def _repetition(self) -> Alarm | None:
        c, drift = self.config, self._drift("distinct_n")
        if c.min_distinct_ratio is None or drift is None or drift[0] <= 0:
            return None
        start, now = drift
        if now >= c.min_distinct_ratio * start:
            return None
        return Alarm(
            "repetition",
            self.history[-1].step,
            f"distinct-n fell from {start:.3g} to {now:.3g}: completions repeat themselves or each other",
            {"start": start, "now": now, "ratio": now / start},
        )

    def _entropy(self) -> Alarm | None:
        c, drift = self.config, self._drift("entropy")
        if drift is None:
            return None
        start, now = drift
        relative = c.min_entropy_ratio is not None and start > 0 and now < c.min_entropy_ratio * start
        absolute = c.entropy_floor is not None and now < c.entropy_floor
        if not (relative or absolute):
            return None
        return Alarm(
            "entropy_collapse",
            self.history[-1].step,
            f"mean token entropy fell from {start:.3g} to {now:.3g} nats: the policy is collapsing onto few outputs",
            {"start": start, "now": now},
        )


# ---------------------------------------------------------------------------------------------------------------
# Helper metrics the recipe measures on the held-out generations


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of whitespace tokens, across all texts (corpus-level distinct-n).

    Li et al., https://arxiv.org/abs/1510.03055. 1.0: no n-gram repeats; near 0: the same words over and over.
    Texts shorter than `n` tokens add nothing; 0.0 when there is no n-gram at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ngrams = [
        tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)
    ]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def mean_token_entropy(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean entropy (nats) of the next-token distributions over the masked positions.

    Shapes: `logits` (B, T, V), `mask` (B, T) with 1 on completion tokens (all positions if None). Returns a
    0-dim fp32 tensor. Computed one sequence at a time so a (T, V) fp32 copy is the peak extra memory.
    """
    entropies = []
    for row in logits:
        logp = torch.log_softmax(row.float(), dim=-1)
        entropies.append(-(logp.exp() * logp).sum(-1))
    entropy = torch.stack(entropies)
    if mask is None:
        return entropy.mean()
    mask = mask.to(entropy.dtype)
    return (entropy * mask).sum() / mask.sum().clamp(min=1.0)
