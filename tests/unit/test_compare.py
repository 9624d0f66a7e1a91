"""compare on the tiny model: every family runs into one leaderboard, skips say why, resume reuses, budgets stop."""

from __future__ import annotations

import json

import pytest

from honellm.cli.compare_cmd import parse_budget, parse_sets
from honellm.compare.compare import compare
from honellm.compare.report import write_report
from honellm.compare.results import CompareRun, leaderboard_text
from honellm.errors import HoneError
from honellm.task import Task
from honellm.testing import make_tiny_task

FAST = {
    "lora": ["max_steps=3", "batch_size=8", "eval_every=0", "save_every=0", "r=4"],
    "grpo": ["max_steps=2", "prompts_per_step=4", "group_size=2", "max_new_tokens=4", "eval_every=0", "save_every=0"],
    "few-shot": ["shots=2"],
}


@pytest.fixture(scope="module")
def compared(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    task = make_tiny_task(folder / "task", tiny_model_dir, n_train=40, n_validation=12)
    run = compare(str(task), ["zero-shot", "few-shot", "lora", "dpo", "grpo"], out=folder / "run",
                  method_overrides=FAST, progress=False)
    return task, run


def test_every_family_lands_in_one_leaderboard_judged_on_the_same_examples(compared):
    _, run = compared
    results = run.results
    assert [results[m].status for m in ("zero-shot", "few-shot", "lora", "grpo")] == ["done"] * 4, \
        {m: r.reason for m, r in results.items()}
    assert {results[m].family for m in results} == {"prompting", "tuning", "reward"}
    # the task has no test split: compare held one out of train (20% of 40) and judged every method on it
    assert run.split == "test" and run.task["held_out"] == {"split": "test", "from": "train", "records": 8, "seed": 0}
    assert {r.n for r in results.values() if r.done} == {8}
    lora = results["lora"]
    assert lora.trainable_params > 0 and lora.train_tokens > 0 and lora.train_seconds > 0
    assert results["zero-shot"].trainable_params == 0 and results["zero-shot"].train_seconds == 0
    assert results["few-shot"].prompt_tokens > results["zero-shot"].prompt_tokens  # demonstrations cost tokens
    assert all(results[m].latency_ms > 0 for m in ("zero-shot", "few-shot", "lora", "grpo"))
    # dpo needs preference pairs: skipped, with the reason
    assert results["dpo"].status == "skipped" and "preference" in results["dpo"].reason
    text = leaderboard_text(run)
    assert "dpo" in text and "skipped" in text and "95% CI" in text
    assert run.recommendation is not None and run.recommendation["method"] in results
    saved = json.loads((run.path / "compare.json").read_text())
    assert set(saved["results"]) == {"zero-shot", "few-shot", "lora", "dpo", "grpo"}


def test_methods_train_without_the_held_out_records(compared):
    _, run = compared
    lora_config = (run.path / "lora" / "metrics.jsonl").read_text()
    start = next(json.loads(line) for line in lora_config.splitlines() if '"event": "start"' in line)
    assert start["total_steps"] == 3
    evaluated = json.loads((run.path / "lora" / "eval.json").read_text())
    assert evaluated["split"] == "test" and evaluated["n"] == 8


def test_grpo_without_task_rewards_trains_on_the_metric(compared):
    _, run = compared
    rows = [json.loads(line) for line in (run.path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "train" and "reward" in r for r in rows)


def test_resume_reuses_finished_methods(compared, tmp_path):
    task, run = compared
    before = {m: r.to_dict() for m, r in run.results.items()}
    again = compare(str(task), ["zero-shot", "few-shot", "lora", "dpo", "grpo"], out=run.path, resume=True,
                    method_overrides=FAST, progress=False)
    for m in ("zero-shot", "few-shot", "lora", "grpo"):
        assert again.results[m].to_dict() == before[m]  # reused, not re-run (latency would differ)
    with pytest.raises(HoneError, match="already exists"):
        compare(str(task), ["zero-shot"], out=run.path, progress=False)
    with pytest.raises(HoneError, match="limit"):
        compare(str(task), ["zero-shot"], out=run.path, resume=True, limit=3, progress=False)


def test_report_holds_the_leaderboard_and_figures(compared):
    _, run = compared
    html = write_report(run.path).read_text()
    assert "<h2>Leaderboard</h2>" in html and "data:image/png;base64," in html
    for method in ("zero-shot", "few-shot", "lora", "grpo", "dpo"):
        assert f"<td>{method}</td>" in html
    assert "Learning curves" in html and "held out from train" in html


def test_unknown_methods_and_splits_are_clear_errors(compared):
    task, _ = compared
    with pytest.raises(HoneError, match="did you mean 'lora'"):
        compare(str(task), ["lorra"], progress=False)
    with pytest.raises(HoneError, match="no validation2|unknown split"):
        compare(str(task), ["zero-shot"], split="validation2", progress=False)


def test_a_time_budget_stops_training_after_the_step_that_spends_it(tiny_model_dir, tmp_path):
    from honellm.methods.catalog import method_config
    from honellm.tuning import tune

    task = Task.load(make_tiny_task(tmp_path / "task", tiny_model_dir))
    _, config = method_config("lora", None, ["max_steps=50", "max_seconds=0.001", "eval_every=0", "save_every=0", "r=4"])
    artifact = tune(task, "lora", config, out=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if r.get("event") == "time_budget"][0]["step"] == 1
    assert artifact.manifest.cost["train_steps"] == 1 and artifact.manifest.metrics["final_step"] == 1


def test_hold_out_carves_a_seeded_split(tiny_model_dir, tmp_path):
    task = Task.load(make_tiny_task(tmp_path / "task", tiny_model_dir, n_train=30))
    train = [dict(r) for r in task.split("train")]
    info = task.hold_out("test", fraction=0.2)
    assert info["records"] == 6 and task.available_splits() == ["train", "validation", "test"]
    test, rest = [dict(r) for r in task.split("test")], [dict(r) for r in task.split("train")]
    assert len(rest) == 24 and sorted(map(json.dumps, test + rest)) == sorted(map(json.dumps, train))
    with pytest.raises(HoneError, match="already has a test split"):
        task.hold_out("test")


def test_budgets_and_method_settings_parse():
    assert parse_budget("20m") == 1200 and parse_budget("90s") == 90 and parse_budget("1h30m") == 5400
    assert parse_budget("1.5h") == 5400 and parse_budget("45") == 45 and parse_budget(None) is None
    with pytest.raises(HoneError, match="cannot read the budget"):
        parse_budget("20 minutes")
    assert parse_sets(["lora:r=16", "lora:lr=1e-4", "dpo:beta=0.2"]) == {"lora": ["r=16", "lr=1e-4"], "dpo": ["beta=0.2"]}
    with pytest.raises(HoneError, match="METHOD:KEY=VALUE"):
        parse_sets(["r=16"])


def test_compare_run_round_trips(compared):
    _, run = compared
    loaded = CompareRun.load(run.path)
    assert loaded.results.keys() == run.results.keys() and loaded.recommendation == run.recommendation


def test_online_rl_rewards_a_label_task_by_the_label_the_answer_commits_to(tiny_model_dir, tmp_path):
    from honellm.reward.rollout import metric_reward

    task = Task.load(make_tiny_task(tmp_path / "task", tiny_model_dir))
    reward = metric_reward(task)
    scores = reward.score(["p"] * 3, ["Positive.", "The review is negative", "positive or negative"],
                          target=["positive", "positive", "negative"])
    assert scores.total == [1.0, 0.0, 0.0]
    text_task = Task.from_config({"name": "t", "model": str(tiny_model_dir), "data": {"train": "x.jsonl"},
                                  "target": "answer", "prompt": {"template": "{q}"}, "metric": "exact_match"})
    text_task._format = "fields"
    assert metric_reward(text_task).score(["p"], ["Nope"], target=["answer"]).total == [0.0]
    assert metric_reward(text_task).score(["p"], ["The answer."], target=["answer"]).total == [1.0]


def test_a_row_is_charged_all_the_work_of_making_its_artifact():
    from honellm.evaluation.cost import making_seconds

    grpo = {"train_seconds": 50.8, "generation_seconds": 30.0, "scoring_seconds": 0.2}  # rollouts are not steps
    assert making_seconds(grpo) == pytest.approx(81.0)
    assert making_seconds({"train_seconds": 10.0, "reference_seconds": 4.0}) == pytest.approx(14.0)
    # a search's (or a composition's) total is all of it already: its best trial's rollouts are not added twice
    assert making_seconds({**grpo, "train_seconds": 500.0, "making_seconds": 500.0}) == 500.0
    assert making_seconds({}, default=7.0) == 7.0 and making_seconds(None) == 0.0


def test_a_composition_s_cost_adds_every_part_s_whole_making():
    from honellm.search.compose import total_cost

    cost = total_cost({"sft": {"train_seconds": 20.0, "train_tokens": 100},
                       "grpo": {"train_seconds": 50.0, "generation_seconds": 30.0, "train_tokens": 400}}, seconds=5.0)
    assert cost["train_seconds"] == cost["making_seconds"] == 105.0 and cost["train_tokens"] == 500
    assert cost["parts"]["grpo"]["train_seconds"] == 80.0
