"""Hyperparameter search per method inside a budget, seeds, and compositions of methods (docs/search.md).

- `spaces.py`: `SPACES`, each method's small search space, keyed by method name
- `study.py`: `search(task, method, n_trials=, budget_seconds=, out=, resume=)` -> `SearchResult` (Optuna TPE,
  successive-halving pruning on the validation rows the recipes log, a crash-safe journal in the run folder)
- `seeds.py`: `run_seeds(...)` -> `SeedSummary` (mean, spread and bootstrap interval over seeds)
- `compose.py`: compositions that end in one artifact with their total cost (SFT then DPO, prompt search on a
  tuned adapter, merging adapters)
"""

from __future__ import annotations

from honellm.search.spaces import SPACES, Choice, Float, Int, space_for
from honellm.search.study import SearchResult, TrialRecord, search

__all__ = ["SPACES", "Choice", "Float", "Int", "SearchResult", "TrialRecord", "search", "space_for"]
