"""The embedded model trained into a judge on `support_prefs` for a few steps: the artifact plugs into
`Judge.load` with the prompt it was trained with, and judges the validation pairs as the recipe measured."""

from __future__ import annotations

import pytest

from honellm.evaluation.judges import DEFAULT_PAIRWISE, DEFAULT_SYSTEM, Judge, calibrate
from honellm.reward.recipes import align_task
from honellm.reward.recipes.judge import pair_texts
from honellm.runs import read_metrics
from honellm.task import Task


@pytest.mark.slow  # 2 LoRA steps of 4 judge examples on SmolLM2-135M, and 2 calibrations on 6 pairs
def test_a_judge_artifact_of_the_embedded_model_plugs_into_judge_load(embedded_model_dir, tmp_path):
    out = tmp_path / "run"
    art = align_task("support_prefs", "judge", ["max_steps=2", "batch_size=4", "eval_every=2", "eval_limit=6",
                                                "train_limit=4", "lr=2e-4"], out=str(out))
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2] and 0 <= evals[0]["val_agreement"] <= 1
    judge = Judge.load(str(out / "artifact"))
    assert judge.config.system == DEFAULT_SYSTEM and judge.config.pairwise_prompt == DEFAULT_PAIRWISE
    calibration = calibrate(judge, pair_texts(Task.load("support_prefs"), "validation", 6))
    # the same weights and prompt: the same verdicts, up to bf16 rounding on a verdict near a tie
    assert calibration.agreement == pytest.approx(art.manifest.metrics["val_agreement"], abs=0.17)
    assert calibration.position_bias == pytest.approx(art.manifest.metrics["val_position_bias"], abs=0.17)
