"""Prompt search on the embedded model and SST-2 (a few candidates on a small validation subset)."""

from __future__ import annotations

import json

from honellm.evaluation.evaluate import evaluate
from honellm.prompting.search import make_prompt_artifact
from honellm.task import Task


def test_search_on_sst2_saves_an_artifact_that_reproduces_its_score(shared_data, embedded_model_dir, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("HONE_RUNS", str(tmp_path / "runs"))
    overrides = [f"data.train={shared_data}/sst2/train.jsonl", f"data.validation={shared_data}/sst2/validation.jsonl"]
    made = make_prompt_artifact("examples/sst2.yaml", overrides, search=3, out=tmp_path / "art", max_examples=16,
                                progress=False)
    rows = (made.run_dir / "candidates.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 3  # header + (uncalibrated, content-free, batch) x 3
    validation = json.loads((tmp_path / "art" / "hone.json").read_text())["metrics"]["validation"]
    again = evaluate(tmp_path / "art", Task.load("examples/sst2.yaml", overrides), "validation", 16, progress=False)
    assert again.score == validation["score"]
