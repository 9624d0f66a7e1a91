"""Percentile-bootstrap confidence intervals over per-example scores.

Every metric gives one score per example, so one interval method serves them all: resample the examples with
replacement, take the mean of each resample, and read the interval off the percentiles of those means
(Efron & Tibshirani 1993, ch. 13). Seeded, so the same scores always give the same interval.
"""

from __future__ import annotations

import math

import numpy as np


def bootstrap_ci(scores: list[float], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                 statistic=np.mean) -> tuple[float, float]:
    """The `confidence` percentile-bootstrap interval of `statistic` (default the mean) of `scores`.

    Returns (nan, nan) for no scores and (s, s) for one. `statistic` takes an array of shape
    (resamples, n) and an `axis` keyword, as numpy reductions do.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        return (math.nan, math.nan)
    if values.size == 1:
        return (float(values[0]), float(values[0]))
    rng = np.random.default_rng(seed)
    index = rng.integers(0, values.size, size=(resamples, values.size))
    means = statistic(values[index], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(low), float(high))
