"""LoRA on real data with the embedded model: a short SST-2 run learns the task, and the memory pre-flight's
estimate is not below the peak it then measures."""

from __future__ import annotations

from honellm.artifact import Artifact
from honellm.runs import read_metrics
from tests.e2e.helpers import hone


def test_short_lora_run_on_sst2_beats_zero_shot(embedded_model_dir, shared_data, tmp_path):
    out = tmp_path / "run"
    overrides = [f"data.train={shared_data / 'sst2' / 'train.jsonl'}",
                 f"data.validation={shared_data / 'sst2' / 'validation.jsonl'}",
                 "max_steps=12", "eval_every=12", "eval_limit=60", "lr=5e-4", "r=8"]
    # its own process, so that the peak resident memory it measures is this run's alone
    result = hone("tune", "examples/sst2.yaml", "--method", "lora", *overrides, "--out", out)
    assert result.returncode == 0, result.stderr
    art = Artifact.load(out / "artifact")
    # zero-shot SmolLM2-135M-Instruct scores 0.60 on this validation split (hone eval)
    assert art.manifest.metrics["val_accuracy"] >= 0.75
    rows = read_metrics(out / "metrics.jsonl")
    start = next(r for r in rows if r.get("event") == "start")
    done = next(r for r in rows if r.get("event") == "done")
    assert start["precision"] in ("bf16", "fp32") and start["trainable_params"] > 1_000_000
    # within the 15% the pre-flight is calibrated to (bench/bench_sizes.py); the run's peak includes its evaluation
    assert start["estimated_peak_memory_bytes"] >= 0.85 * done["peak_memory_bytes"]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-4:]) < sum(losses[:4])
