"""Tracking: `report_to` sends a run's config, every metrics line (steps, guard signals, the final evaluation) to
TensorBoard and MLflow; read back from their local stores here (TensorBoard event files, an MLflow file store)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from honellm.errors import HoneError, MissingDependency
from honellm.testing import make_tiny_task
from honellm.tracking import Tracking, check_available, metric_values, parse_report_to
from honellm.training.config import TrainingConfig

pytest.importorskip("tensorboard", reason="the dev extra installs tensorboard")
pytest.importorskip("mlflow", reason="the dev extra installs mlflow-skinny")


def _scalars(folder):
    """{tag: [(step, value)]} of the TensorBoard event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _mlflow_run(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    return client, runs[0]


@pytest.fixture
def file_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # unset for Hone, and restored after the test (MLflow sets it)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def test_report_to_is_a_list_of_known_trackers():
    assert TrainingConfig().report_to == []
    assert TrainingConfig(report_to="tensorboard,mlflow").report_to == ["tensorboard", "mlflow"]
    assert TrainingConfig(report_to=["TensorBoard"]).report_to == ["tensorboard"]
    assert TrainingConfig(report_to="none").report_to == []
    with pytest.raises(ValueError, match="tensorboard"):
        TrainingConfig(report_to=["tensorbord"])
    assert parse_report_to("mlflow, wandb") == ["mlflow", "wandb"]
    with pytest.raises(HoneError, match="unknown tracker"):
        parse_report_to("comet")


def test_a_missing_library_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(MissingDependency) as info:
        check_available(["tensorboard", "wandb"])
    assert "honellm[wandb]" in info.value.fix and "wandb" in info.value.what


def test_metric_lines_become_named_numbers():
    assert metric_values({"time": 1.0, "step": 3, "loss": 0.5, "lr": 1e-4, "tokens": 12}) == \
        {"loss": 0.5, "lr": 1e-4, "tokens": 12}
    assert metric_values({"step": 4, "kind": "guard", "proxy": 0.9, "gold": None, "kl": 0.1}) == \
        {"guard/proxy": 0.9, "guard/kl": 0.1}
    assert metric_values({"step": 4, "kind": "alarm", "alarm": "length_collapse", "message": "x", "ratio": 0.2}) == \
        {"alarm/length_collapse/raised": 1, "alarm/length_collapse/ratio": 0.2}
    assert metric_values({"event": "done", "val": {"accuracy": 0.75}, "stopped": True, "bad": float("nan"),
                          "alarms": ["kl"]}) == {"done/val/accuracy": 0.75, "done/stopped": 1}


def test_a_tuning_run_reports_config_steps_and_final_evaluation(tiny_model_dir, tmp_path, file_store):
    from honellm.tuning import tune_task

    task = make_tiny_task(tmp_path / "task", tiny_model_dir)
    out = tmp_path / "run"
    tune_task(str(task), "lora", ["max_steps=4", "eval_every=2", "report_to=[tensorboard,mlflow]"], out=str(out))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r and "event" not in r and "kind" not in r]
    done = next(r for r in lines if r.get("event") == "done")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]

    scalars = _scalars(out / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in steps])
    assert scalars["done/final_step"] == [(4, 4.0)]
    assert scalars["done/train_tokens"][0][1] == done["train_tokens"]
    evaluated = [k for k in done if k.startswith("val")]
    assert evaluated and all(f"done/{k}" in scalars for k in evaluated if isinstance(done[k], (int, float)))

    client, run = _mlflow_run(out / "mlruns")
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["config/lr"] == "0.0002" and run.data.params["method"] == "lora"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in steps]
    assert run.data.metrics["done/final_step"] == 4


def test_guard_signals_and_events_reach_both_stores(tmp_path, file_store):
    from honellm.runs import RunDir

    run = RunDir.create("tiny", "grpo", out=tmp_path / "grpo-run")
    run.tracking = Tracking.start(["tensorboard", "mlflow"], project="tiny", run_dir=run.path,
                                  config={"method": "grpo", "config": {"beta": 0.04, "guard": {"kl_max": 8.0}}})
    run.log_metrics(step=1, loss=0.3, reward=0.5)
    run.log_metrics(step=2, kind="guard", proxy=0.7, gold=0.6, kl=0.25)
    run.log_metrics(step=2, kind="alarm", alarm="proxy_gold_divergence", message="proxy up, gold down", gap=0.3)
    run.log_metrics(event="done", validation={"reward": 0.61})
    run.close()
    scalars = _scalars(run.path / "tensorboard")
    assert scalars["guard/kl"] == [(2, 0.25)] and scalars["alarm/proxy_gold_divergence/raised"] == [(2, 1.0)]
    assert scalars["done/validation/reward"][0] == (2, pytest.approx(0.61))
    _, logged = _mlflow_run(run.path / "mlruns")
    assert logged.data.metrics["guard/gold"] == pytest.approx(0.6)
    assert logged.data.params["config/guard/kl_max"] == "8.0" and logged.data.params["config/beta"] == "0.04"
    assert len(run.read_metrics()) == 4  # metrics.jsonl is written as before


def test_resuming_may_change_report_to(tmp_path):
    import yaml

    from honellm.training.run_folder import check_same_config

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"method": "lora", "config": {"lr": 0.1, "report_to": []}}))
    check_same_config(path, {"method": "lora", "config": {"lr": 0.1, "report_to": ["tensorboard"]}})
    with pytest.raises(HoneError, match="lr"):
        check_same_config(path, {"method": "lora", "config": {"lr": 0.2, "report_to": []}})


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_hosted_trackers_need_their_library(name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed; its offline run is not exercised here (see docs/tracking.md)")
    with pytest.raises(MissingDependency, match=name):
        Tracking.start([name], project="p", run_dir="unused")


def test_a_prompt_search_reports_each_candidate(tiny_model_dir, tmp_path, monkeypatch):
    from honellm.prompting.search import PromptSearchConfig, make_prompt_artifact

    monkeypatch.setenv("HONE_RUNS", str(tmp_path / "runs"))
    config = PromptSearchConfig(candidates=2, shots=[2], fixed_selectors=["random"], per_query_selectors=[],
                                calibrations=[], max_examples=4, propose=0, pool_size=20, report_to="tensorboard")
    made = make_prompt_artifact("intents", ["prompt.instructions=[]"], search=2, model_name=str(tiny_model_dir),
                                out=tmp_path / "art", search_config=config, progress=False)
    lines = (made.run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if "score" in r]  # one line per candidate
    scalars = _scalars(made.run_dir / "tensorboard")
    assert [s for s, _ in scalars["score"]] == [r["id"] for r in rows] and len(rows) >= 2
    assert [v for _, v in scalars["score"]] == pytest.approx([r["score"] for r in rows])
    assert scalars["validation_score"][0][1] == pytest.approx(made.validation["score"])


def test_a_run_that_never_closed_does_not_block_the_next(tmp_path, file_store):
    crashed = Tracking.start(["mlflow"], project="tiny", run_dir=tmp_path / "a")
    crashed.log({"step": 1, "loss": 1.0})  # ... and the run dies without finish()
    after = Tracking.start(["mlflow"], project="tiny", run_dir=tmp_path / "b")
    after.log({"step": 1, "loss": 0.5})
    after.finish()
    assert _mlflow_run(tmp_path / "a" / "mlruns")[1].info.status == "FAILED"
    client, run = _mlflow_run(tmp_path / "b" / "mlruns")
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 0.5
