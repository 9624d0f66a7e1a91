"""The embedded model on the built-in `support_prefs` task: a short DPO run (LoRA) learns the preference on
held-out pairs, and `hone eval` of the artifact agrees with the recipe's own validation score."""

from __future__ import annotations

import pytest

from honellm.evaluation.evaluate import evaluate
from honellm.reward.recipes import align_task
from honellm.task import Task


@pytest.mark.slow  # ~12 LoRA steps of 8 pairs on SmolLM2-135M, plus two passes over 100 validation pairs
def test_dpo_learns_support_preferences(embedded_model_dir, tmp_path):
    out = tmp_path / "run"
    art = align_task("support_prefs", "dpo", ["max_steps=12", "batch_size=8", "lr=3e-4", "eval_every=12",
                                              "warmup_ratio=0.1"], out=str(out))
    assert art.manifest.metrics["val_accuracy"] > 0.6
    result = evaluate(out / "artifact", Task.load("support_prefs"), "validation", progress=False)
    assert result.extras["preference_scorer"] == "implicit_reward_margins"
    assert result.score == pytest.approx(art.manifest.metrics["val_accuracy"], abs=0.05)
    assert result.ci95[0] > 0.5
