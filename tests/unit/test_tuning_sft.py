"""The SFT recipe on the tiny model: artifact and metrics, best-weights selection and early stopping, the memory
pre-flight, the non-finite stop, and resume checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from honellm.artifact import Artifact
from honellm.errors import HoneError
from honellm.runs import read_metrics
from honellm.testing import make_tiny_task
from honellm.training.logprobs import LossOutput
from honellm.tuning import tune_task


@pytest.fixture(scope="module")
def task_yaml(tiny_model_dir, tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("task"), tiny_model_dir)


def test_lora_run_writes_artifact_metrics_and_cost(task_yaml, tmp_path):
    out = tmp_path / "run"
    art = tune_task(str(task_yaml), "lora", ["max_steps=6", "eval_every=3", "lr=5e-3", "r=4"], out=str(out))
    assert art.path == out / "artifact"
    loaded = Artifact.load(out / "artifact")  # the base model's hash is verified
    assert loaded.kind == "adapter" and loaded.manifest.method == "lora"
    assert loaded.manifest.config["r"] == 4 and loaded.manifest.config["method"] == "lora"
    assert loaded.program.system == "Classify the review." and loaded.program.template == "Review: {text}"
    cost, metrics = loaded.manifest.cost, loaded.manifest.metrics
    for key in ("trainable_params", "total_params", "train_seconds", "train_tokens", "tokens_per_second",
                "peak_memory_bytes"):
        assert cost[key] > 0, key
    assert cost["trainable_params"] < cost["total_params"]
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["val_loss"] > 0 and metrics["best_step"] in (3, 6)
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_second"] > 0 and r["units"] > 0 and r["lr"] > 0 for r in steps)
    assert [r["step"] for r in rows if r.get("event") == "eval"] == [3, 6]
    assert sum(r["tokens"] for r in steps) == cost["train_tokens"]
    model, _ = loaded.load_model(dtype="fp32", device="cpu")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == cost["trainable_params"]


def test_early_stopping_keeps_the_best_evaluation_s_weights(task_yaml, tmp_path):
    out = tmp_path / "run"
    tune_task(str(task_yaml), "lora", ["max_steps=30", "eval_every=1", "lr=0.05", "early_stopping_patience=2",
                                       "warmup_ratio=0"], out=str(out))
    rows = read_metrics(out / "metrics.jsonl")
    evals = [r for r in rows if r.get("event") == "eval"]
    done = next(r for r in rows if r.get("event") == "done")
    stopped = [r for r in rows if r.get("event") == "early_stop"]
    best = min(evals, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["step"]))
    assert done["selected_step"] == best["step"] == done["best_step"]
    if stopped:  # two evaluations in a row without improvement ended the run
        assert done["final_step"] == stopped[0]["step"] == evals[-1]["step"] < 30
        assert [r["best_step"] for r in evals[-2:]] == [best["step"]] * 2
    adapter = load_file(out / "artifact" / "adapter" / "adapter_model.safetensors")
    best_weights = load_file(out / "checkpoints" / "best.safetensors")
    for name, tensor in best_weights.items():
        key = name.replace(".default.weight", ".weight")
        assert torch.equal(adapter[key], tensor), name


def test_memory_preflight_refuses_before_training(task_yaml, tmp_path):
    with pytest.raises(HoneError) as info:
        tune_task(str(task_yaml), "lora", ["max_steps=2", "memory_limit_gb=0.01"], out=str(tmp_path / "run"))
    assert info.value.where == "memory pre-flight"
    assert "memory_limit_gb=0.01" in info.value.what and "GiB" in info.value.what
    assert "smaller base model" in info.value.fix
    assert not any(r.get("loss") for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(task_yaml, tmp_path, monkeypatch):
    import honellm.tuning.sft as sft

    calls = {"n": 0}
    real = sft.sft_loss

    def loss_going_nan(model, batch):
        calls["n"] += 1
        out = real(model, batch)
        return LossOutput(out.total * float("nan"), out.count) if calls["n"] > 5 else out

    monkeypatch.setattr(sft, "sft_loss", loss_going_nan)
    out = tmp_path / "run"
    with pytest.raises(HoneError) as info:
        tune_task(str(task_yaml), "lora", ["max_steps=10", "save_every=2", "eval_every=0"], out=str(out))
    assert "loss became nan at step 6" in info.value.what
    assert "step-000004" in info.value.fix and (out / "checkpoints" / "step-000004" / "state.json").exists()
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["event"] == "non_finite_loss" and rows[-1]["step"] == 6
    assert not (out / "artifact").exists()


def test_resume_refuses_other_settings_and_other_methods(task_yaml, tmp_path):
    out = tmp_path / "run"
    tune_task(str(task_yaml), "lora", ["max_steps=2", "eval_every=0"], out=str(out))
    with pytest.raises(HoneError, match=r"settings differ .*lr: 0.0002 -> 0.001"):
        tune_task(str(task_yaml), "lora", ["max_steps=2", "eval_every=0", "lr=1e-3"], out=str(out), resume=True)
    with pytest.raises(HoneError, match="started with method 'lora'"):
        tune_task(str(task_yaml), "dora", ["max_steps=2", "eval_every=0"], out=str(out), resume=True)
    with pytest.raises(HoneError, match="--force"):
        tune_task(str(task_yaml), "lora", ["max_steps=2"], out=str(out))


def test_full_fine_tuning_saves_whole_weights(task_yaml, tmp_path):
    out = tmp_path / "run"
    art = tune_task(str(task_yaml), "full", ["max_steps=2", "eval_every=0"], out=str(out))
    assert art.kind == "full" and (out / "artifact" / "model" / "model.safetensors").exists()
    config = json.loads((out / "artifact" / "model" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert art.manifest.cost["trainable_params"] == art.manifest.cost["total_params"]


def test_prompt_learning_fallback_scores_like_evaluate(task_yaml, tiny_model_dir):
    """The engine behind evaluate() does not run prompt-learning models, so the recipe scores those itself; on a
    model both can score, both give the same predictions."""
    import numpy as np

    from honellm.evaluation.evaluate import evaluate
    from honellm.models import load
    from honellm.program import PromptProgram
    from honellm.task import Task
    from honellm.training.precision import Precision
    from honellm.training.validation import score_sequences
    from honellm.tuning.config import SFTConfig
    from honellm.tuning.sft import _validation_set

    task = Task.load(str(task_yaml))
    model, tokenizer = load(tiny_model_dir, dtype="fp32", device="cpu")
    art = Artifact.create(name="t", method="lora", base_model=str(tiny_model_dir), program=PromptProgram.from_task(task),
                          task=task)
    validation = _validation_set(task, art, tokenizer, SFTConfig())
    fp32 = Precision(torch.float32, "cpu")
    flat = [seq for row in validation.choice_sequences for seq in row]
    sums, _ = score_sequences(model, flat, pad_id=tokenizer.pad_token_id, precision=fp32)
    ours = [task.config.choices[j] for j in sums.reshape(-1, 2).argmax(axis=1)]
    result = evaluate(art, task, "validation", model=model, tokenizer=tokenizer, progress=False)
    theirs = [e.prediction for e in result.records]
    assert ours == theirs
    assert result.score == pytest.approx(np.mean([p == r for p, r in zip(ours, validation.references, strict=True)]))


def test_prompt_tuning_on_a_text_metric_scores_greedy_answers(task_yaml, tmp_path):
    """Without label choices the score comes from greedy answers; for prompt-learning models the recipe generates
    them itself (the generation engine does not run virtual tokens)."""
    art = tune_task(str(task_yaml), "prompt_tuning", ["choices=null", "metric=exact_match", "max_steps=2",
                                                      "eval_every=2", "generation.max_new_tokens=3"],
                    out=str(tmp_path / "run"))
    assert 0 <= art.manifest.metrics["val_exact_match"] <= 1
    assert art.manifest.metrics["val_loss"] > 0


@pytest.mark.slow  # torch.compile of the decoder layers: a minute or more on 2 cores (cached afterwards)
def test_compiled_layers_train_like_eager_ones(task_yaml, tmp_path):
    args = ["max_steps=3", "eval_every=0", "precision=fp32", "lr=1e-2"]
    plain = tune_task(str(task_yaml), "lora", args, out=str(tmp_path / "plain"))
    compiled = tune_task(str(task_yaml), "lora", [*args, "compile=true"], out=str(tmp_path / "compiled"))
    a = load_file(plain.path / "adapter" / "adapter_model.safetensors")
    b = load_file(compiled.path / "adapter" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5)
