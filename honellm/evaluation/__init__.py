"""Evaluation: metrics (one registry), scoring modes, preference scorers, and the result types.

`evaluate()` -> EvalResult (quality with a 95% bootstrap interval, and cost) lives in
`honellm.evaluation.evaluate`: it applies the artifact's runtime (honellm.runtime), which sits above the parts
here, so this package does not import it (docs/architecture.md).
"""

from honellm.evaluation.bootstrap import bootstrap_ci
from honellm.evaluation.metrics import METRICS, register_metric
from honellm.evaluation.preference import PREFERENCE_SCORERS, register_preference_scorer
from honellm.evaluation.result import EvalCost, EvalResult, ExampleResult

__all__ = ["METRICS", "PREFERENCE_SCORERS", "EvalCost", "EvalResult", "ExampleResult", "bootstrap_ci",
           "register_metric", "register_preference_scorer"]
