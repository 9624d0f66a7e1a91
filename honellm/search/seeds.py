"""The best configuration re-run with several seeds: how much the result moves with the seed.

`run_seeds(task, method, overrides, seeds=(0, 1, 2), out=...)` makes the method's artifact once per seed (the
seed sets adapter init, data order and dropout; for prompting, the demonstrations drawn) into `out/seed-N/`,
scores each on `split` with the evaluator (`out/seed-N/eval.json`), and returns a `SeedSummary`: every seed's
score, their mean, the spread (min-max and standard deviation) and a 95% bootstrap interval of the mean over examples of the
seed-averaged per-example scores. `seeds.json` in `out` keeps it. `compare.recommend.spreads_overlap` treats two
methods whose seed spreads overlap as tied.

`seeds_for_budget(left, seconds_per_run)` says how many seeds fit in what is left of a budget (3 where it allows,
at least 1).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from honellm.atomic import atomic_write_text

DEFAULT_SEEDS = 3


@dataclass
class SeedSummary:
    method: str
    split: str
    metric: str
    seeds: list[int]
    scores: list[float]
    mean: float
    std: float
    low: float  # min over seeds
    high: float  # max over seeds
    ci95: tuple[float, float]
    artifacts: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    per_example: list[list[float]] = field(default_factory=list, repr=False)  # each seed's, not in seeds.json

    @property
    def spread(self) -> tuple[float, float]:
        return (self.low, self.high)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("per_example")
        return {**data, "ci95": list(self.ci95)}


def summarize_seeds(method: str, seeds: list[int], scores: list[float], per_example: list[list[float]] | None = None,
                    *, split: str = "validation", metric: str = "", artifacts: list[str] | None = None,
                    seconds: list[float] | None = None) -> SeedSummary:
    """Mean, spread and bootstrap interval of `scores` (one per seed; `per_example`: each seed's example scores,
    the same examples in the same order, for the interval)."""
    from honellm.evaluation.bootstrap import bootstrap_ci

    if not scores:
        raise ValueError("no seed finished")
    mean = statistics.fmean(scores)
    std = statistics.stdev(scores) if len(scores) > 1 else 0.0
    if per_example and all(len(p) == len(per_example[0]) for p in per_example) and per_example[0]:
        averaged = [statistics.fmean(values) for values in zip(*per_example, strict=True)]
        ci = bootstrap_ci(averaged)
    else:
        ci = (math.nan, math.nan)
    return SeedSummary(method, split, metric, list(seeds), [float(s) for s in scores], mean, std, min(scores),
                       max(scores), ci, list(artifacts or []), list(seconds or []),
                       [list(p) for p in per_example or []])


def seeds_for_budget(left: float | None, seconds_per_run: float, wanted: int = DEFAULT_SEEDS) -> int:
    """Seeds that fit in `left` seconds at `seconds_per_run` each: `wanted` where it allows, never fewer than 1."""
    if left is None or seconds_per_run <= 0:
        return wanted
    return max(1, min(wanted, int(left // seconds_per_run)))


def run_seeds(task, method: str, overrides: list[str] | None = None, *, seeds: list[int] | tuple[int, ...] = (0, 1, 2),
              out: str | Path, split: str = "validation", limit: int | None = None,
              progress: bool = True) -> SeedSummary:
    """Make `method` with `overrides` once per seed into `out/seed-N/`, score each on `split`; see the module doc."""
    from honellm.evaluation.evaluate import evaluate
    from honellm.search.study import method_family, run_method

    family = method_family(method)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = [o for o in overrides or [] if o.split("=", 1)[0].strip() != "seed"]
    params: dict = {}
    if family == "prompting":  # the prompt builder takes its settings as values, not overrides
        params, base = {k.strip(): v for k, v in (o.split("=", 1) for o in base)}, []
    scores, per_example, artifacts, seconds = [], [], [], []
    metric = task.metric
    for seed in seeds:
        folder = out / f"seed-{seed}"
        started = time.perf_counter()
        run_method(task, method, family, params, base, folder, seed=seed, progress=progress)
        seconds.append(time.perf_counter() - started)
        from honellm.artifact import Artifact

        artifact = Artifact.load(folder / "artifact", verify_base=False)
        result = evaluate(artifact, task, split, limit, progress=progress)
        result.save(folder / "eval.json")
        metric = result.metric
        scores.append(float(result.score))
        per_example.append([float(s) for s in result.scores])
        artifacts.append(str(folder / "artifact"))
    summary = summarize_seeds(method, list(seeds), scores, per_example, split=split, metric=metric,
                              artifacts=artifacts, seconds=seconds)
    atomic_write_text(out / "seeds.json", json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary
