"""EvalResult: what one evaluation found, quality and cost together, and its `eval.json`.

```json
{"task": "sst2", "split": "validation", "metric": "accuracy", "score": 0.82, "ci95": [0.74, 0.89], "n": 100,
 "mode": "choices", "extras": {"acc": 0.82, "acc_norm": 0.8}, "cost": {"prompt_tokens_per_example": 61.2, ...},
 "artifact": {...}, "config": {"limit": null, "seed": 0, ...}, "records": [{"index": 0, "prompt": "...", ...}]}
```
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from honellm.atomic import atomic_write_json

EVAL_FILE = "eval.json"
EVAL_FORMAT_VERSION = 1


@dataclass
class ExampleResult:
    """One scored example: what the model saw, what it answered, the reference, and the example's score."""

    index: int
    prompt: str
    prediction: str
    reference: str | None
    score: float
    details: dict[str, Any] = field(default_factory=dict)  # e.g. per-choice log-probabilities, a margin, rewards
    query: str | None = None  # the record's own user turn (the prompt without system text and demonstrations)


@dataclass
class EvalCost:
    """What the evaluation cost: tokens the model read per example, speed, time and peak memory."""

    prompt_tokens_per_example: float = 0.0
    completion_tokens_per_example: float | None = None  # generated tokens; None where nothing is generated
    shared_prefix_tokens: int = 0  # tokens of the prefix every prompt shares (its KV computed once)
    examples_per_second: float = 0.0
    wall_seconds: float = 0.0
    peak_memory_mb: float | None = None
    memory_kind: str = ""  # "cpu_rss_high_water" or "cuda_max_allocated"


@dataclass
class EvalResult:
    """The headline metric with its 95% bootstrap interval, cost, extras, and every example's record."""

    task: str
    split: str
    metric: str
    score: float
    ci95: tuple[float, float]
    n: int
    mode: str  # how the examples were scored: text, choices, nll, reward, preference
    higher_is_better: bool = True
    extras: dict[str, Any] = field(default_factory=dict)
    cost: EvalCost = field(default_factory=EvalCost)
    artifact: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    records: list[ExampleResult] = field(default_factory=list)
    created_at: str = ""

    @property
    def scores(self) -> list[float]:
        return [r.score for r in self.records]

    def summary(self) -> dict[str, Any]:
        """The numbers without the per-example records (what a manifest or a table keeps)."""
        return {
            "task": self.task, "split": self.split, "metric": self.metric, "score": _finite(self.score),
            "ci95": [_finite(v) for v in self.ci95], "n": self.n, "mode": self.mode,
            "extras": self.extras, "cost": asdict(self.cost),
            "limit": self.config.get("limit"),
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format_version"] = EVAL_FORMAT_VERSION
        data["score"] = _finite(self.score)
        data["ci95"] = [_finite(v) for v in self.ci95]
        return data

    def save(self, path: str | Path) -> Path:
        """Write `eval.json` atomically into the folder `path` (or to `path` itself when it ends in .json)."""
        path = Path(path)
        target = path if path.suffix == ".json" else path / EVAL_FILE
        atomic_write_json(target, self.to_dict())
        return target

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        path = Path(path)
        target = path if path.suffix == ".json" else path / EVAL_FILE
        data = json.loads(target.read_text(encoding="utf-8"))
        data.pop("format_version", None)
        data["ci95"] = tuple(math.nan if v is None else v for v in data["ci95"])
        data["score"] = math.nan if data["score"] is None else data["score"]
        data["cost"] = EvalCost(**data.get("cost", {}))
        data["records"] = [ExampleResult(**r) for r in data.get("records", [])]
        return cls(**data)


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined score (no examples) is written as null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
