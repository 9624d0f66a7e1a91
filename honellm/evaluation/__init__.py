"""Evaluation: metrics (one registry), scoring modes, and `evaluate()` -> EvalResult (quality with a 95%
bootstrap interval, and cost)."""

from honellm.evaluation.bootstrap import bootstrap_ci
from honellm.evaluation.evaluate import evaluate, evaluate_to_folder
from honellm.evaluation.judges import Judge, JudgeConfig, calibrate  # registers judge_win_rate and its mode
from honellm.evaluation.metrics import METRICS, register_metric
from honellm.evaluation.preference import PREFERENCE_SCORERS, register_preference_scorer
from honellm.evaluation.result import EvalCost, EvalResult, ExampleResult

__all__ = ["METRICS", "Judge", "JudgeConfig", "calibrate", "PREFERENCE_SCORERS", "EvalCost", "EvalResult", "ExampleResult", "bootstrap_ci", "evaluate",
           "evaluate_to_folder", "register_metric", "register_preference_scorer"]
