"""Hyperparameter search (honellm/search): trials on the tiny model, pruning, never the test split, resume after a
crash, the seeds summary and the tie rule on seed spreads, data.test beside data.file, a composition."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from honellm.artifact import Artifact
from honellm.compare.recommend import recommend, spreads_overlap
from honellm.compare.results import MethodResult
from honellm.errors import HoneError
from honellm.runs import observe_metrics, read_metrics
from honellm.search import Choice, Float, search
from honellm.search import study as study_module
from honellm.search.seeds import seeds_for_budget, summarize_seeds
from honellm.task import Task
from honellm.testing import make_tiny_task


@pytest.fixture(scope="module")
def task_yaml(tiny_model_dir, tmp_path_factory):
    """The tiny sentiment task with a test split too (a copy of validation: the search must never read it)."""
    path = make_tiny_task(tmp_path_factory.mktemp("task"), tiny_model_dir)
    shutil.copy(path.parent / "validation.jsonl", path.parent / "test.jsonl")
    path.write_text(path.read_text().replace("validation: validation.jsonl}",
                                             "validation: validation.jsonl, test: test.jsonl}"))
    return path


def test_search_runs_prunes_a_hopeless_trial_logs_every_trial_and_never_reads_test(task_yaml, tmp_path,
                                                                                 monkeypatch):
    task = Task.load(str(task_yaml))
    assert task.has_split("test")
    read = []
    original = Task.split
    monkeypatch.setattr(Task, "split", lambda self, name: read.append(name) or original(self, name))
    out = tmp_path / "search"
    # lr=3 is absurd: its validation score falls behind the sound trial's at the same step, and it is stopped.
    result = search(task, "lora", n_trials=3, out=out, progress=False,
                    base_overrides=["max_steps=3", "eval_every=1", "r=4", "lr=1e-2", "warmup_ratio=0", "eval_limit=8"],
                    space=[Choice("lr", (1e-2, 3.0, 3e-3))], enqueue=[{"lr": 1e-2}, {"lr": 3.0}])
    assert "test" not in read and "validation" in read
    rows = read_metrics(out / "metrics.jsonl")
    trials = [r for r in rows if r.get("event") == "trial"]
    assert [r["trial"] for r in trials] == [0, 1, 2]
    for row in trials:
        assert set(row["params"]) == {"lr"} and row["state"] in ("complete", "pruned") and row["seconds"] >= 0
    absurd = next(r for r in trials if r["params"]["lr"] == 3.0)
    assert absurd["state"] == "pruned" and absurd["pruned_at_step"] in (1, 2, 3) and absurd["score"] is None
    assert any(r.get("event") == "pruned" for r in read_metrics(out / "trials" / "trial-001" / "metrics.jsonl"))
    assert result.pruned >= 1 and result.best_params == {"lr": 1e-2}
    assert trials[0]["state"] == "complete" and result.best_score == trials[0]["score"]
    assert "lr=0.01" in result.best_overrides and "max_steps=3" in result.best_overrides
    assert isinstance(result.artifact, Artifact) and result.artifact.kind == "adapter"
    best = json.loads((out / "best.json").read_text())
    assert best["best_trial"] == 0 and best["artifact"].endswith("trial-000/artifact") and best["pruned"] >= 1
    assert (out / study_module.STUDY_FILE).exists()


def test_the_guard_refuses_the_test_split_inside_a_search(task_yaml):
    task = Task.load(str(task_yaml))
    with study_module._no_test(task), pytest.raises(AssertionError, match="validation only"):
        task.split("test")
    assert len(task.split("test")) == 16  # outside the search it is readable again


def _fake_trials(monkeypatch, tiny_model_dir, crash_on: int | None = None):
    """Replace training by a quick score of lr (best near 1e-3) that saves a zero-shot artifact; the call
    numbered `crash_on` raises as a killed process would."""
    calls = []

    def run_method(task, method, family, params, base_overrides, out, **kwargs):
        calls.append(params)
        if crash_on is not None and len(calls) == crash_on:
            raise RuntimeError("simulated crash")
        Artifact.zero_shot(str(tiny_model_dir), task).save(out / "artifact", force=True)
        return 1.0 - abs(params.get("lr", 1e-3) - 1e-3)

    monkeypatch.setattr(study_module, "run_method", run_method)
    return calls


def test_search_resumes_the_same_study_after_a_crash(task_yaml, tiny_model_dir, tmp_path, monkeypatch):
    task = Task.load(str(task_yaml))
    out = tmp_path / "search"
    space = [Float("lr", 1e-5, 1e-2, log=True)]
    calls = _fake_trials(monkeypatch, tiny_model_dir, crash_on=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        search(task, "lora", n_trials=4, out=out, space=space, progress=False)
    lost = calls[-1]
    with pytest.raises(HoneError, match="already exists"):
        search(task, "lora", n_trials=4, out=out, space=space, progress=False)  # not without resume
    calls = _fake_trials(monkeypatch, tiny_model_dir)
    result = search(task, "lora", n_trials=4, out=out, space=space, progress=False, resume=True)
    assert calls[0] == lost  # the trial the crash interrupted runs again, first
    assert len(calls) == 2  # two trials had finished before the crash
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["trial"] for r in rows if r.get("event") == "trial_lost"] == [2]
    assert [r["trial"] for r in rows if r.get("event") == "trial"] == [0, 1, 3, 4]
    assert len(result.trials) == 4 and all(t.state == "complete" for t in result.trials)
    assert result.trials[0].params == {"lr": pytest.approx(2e-4)}  # the method's defaults are the first trial
    assert result.best_score == max(t.score for t in result.trials)


def test_a_budget_stops_starting_trials(task_yaml, tiny_model_dir, tmp_path, monkeypatch):
    calls = _fake_trials(monkeypatch, tiny_model_dir)
    with pytest.raises(HoneError, match="no ia3 trial finished"):
        search(Task.load(str(task_yaml)), "ia3", n_trials=50, budget_seconds=1e-9, out=tmp_path / "s",
               progress=False)
    assert calls == []
    assert any(r.get("event") == "time_budget" for r in read_metrics(tmp_path / "s" / "metrics.jsonl"))


def test_the_search_leaves_the_seeds_reserve_of_its_budget(task_yaml, tiny_model_dir, tmp_path, monkeypatch):
    import time

    calls = _fake_trials(monkeypatch, tiny_model_dir)
    fake = study_module.run_method
    given = []

    def slow(*args, max_seconds=None, **kwargs):
        given.append(max_seconds)
        time.sleep(min(0.4, max_seconds))  # a recipe stops at its max_seconds
        return fake(*args, **kwargs)

    monkeypatch.setattr(study_module, "run_method", slow)
    # 0.4 s trials in a 3 s budget with 2 seeds' reserve (0.8 s+): trials start only while 3 - 0.8 s is not spent,
    # and not when what is left is shorter than a trial so far.
    search(Task.load(str(task_yaml)), "ia3", n_trials=50, budget_seconds=3.0, reserve_runs=2, out=tmp_path / "s",
           progress=False)
    rows = read_metrics(tmp_path / "s" / "metrics.jsonl")
    first = next(r["seconds"] for r in rows if r.get("event") == "trial")
    seconds = [r["seconds"] for r in rows if r.get("event") == "trial"]
    assert 2 <= len(calls) <= 6
    # the first trial may use the whole budget; the next one what is left after it and 2 runs of its length
    assert given[0] == pytest.approx(3.0, abs=0.1) and 0 < given[1] <= 3.0 - 3 * first + 0.02
    stop = next(r for r in rows if r.get("event") == "time_budget")
    assert stop["reserved_seconds"] >= 0.8 and stop["left_seconds"] <= min(seconds)
    assert sum(seconds) + stop["reserved_seconds"] <= 3.0 + 0.25  # no trial ran into the reserve (but its saving)
    assert all(g > first for g in given[1:])  # no trial started with less time than the first one took


def test_unknown_or_unsearchable_method_is_a_clear_error(task_yaml, tmp_path):
    task = Task.load(str(task_yaml))
    with pytest.raises(HoneError, match="unknown method 'lorra'"):
        search(task, "lorra", out=tmp_path / "a")
    with pytest.raises(HoneError, match="has no search space"):
        search(task, "full", out=tmp_path / "b")


def test_observe_metrics_sees_every_line_and_stops_watching_after(tmp_path):
    from honellm.runs import RunDir

    seen = []
    run = RunDir.create("t", "m", out=tmp_path / "r")
    with observe_metrics(lambda r, record: seen.append((r, record))):
        run.log_metrics(step=1, event="eval", val_accuracy=0.5)
    run.log_metrics(step=2, loss=1.0)
    run.close()
    assert len(seen) == 1 and seen[0][0] is run and seen[0][1]["val_accuracy"] == 0.5
    assert len(read_metrics(tmp_path / "r" / "metrics.jsonl")) == 2


# ------------------------------------------------------------------------------------------------ seeds


def test_seed_summary_mean_spread_and_interval():
    summary = summarize_seeds("lora", [0, 1, 2], [0.8, 0.9, 0.85],
                              [[1, 1, 0, 1], [1, 1, 1, 1], [1, 0, 1, 1]], metric="accuracy")
    assert summary.mean == pytest.approx(0.85) and summary.spread == (0.8, 0.9)
    assert summary.std == pytest.approx(0.05)
    low, high = summary.ci95
    assert 0 <= low <= summary.mean <= high <= 1
    assert json.loads(json.dumps(summary.to_dict()))["scores"] == [0.8, 0.9, 0.85]
    assert seeds_for_budget(None, 10) == 3 and seeds_for_budget(25, 10) == 2 and seeds_for_budget(1, 10) == 1


def test_run_seeds_makes_one_artifact_per_seed_and_scores_each(task_yaml, tiny_model_dir, tmp_path, monkeypatch):
    from honellm.search.seeds import run_seeds

    seen = []

    def run_method(task, method, family, params, base_overrides, out, *, seed=0, **kwargs):
        seen.append((seed, list(base_overrides)))
        Artifact.zero_shot(str(tiny_model_dir), task).save(out / "artifact", force=True)
        return 0.0

    monkeypatch.setattr(study_module, "run_method", run_method)
    summary = run_seeds(Task.load(str(task_yaml)), "lora", ["r=4", "seed=9"], seeds=(0, 1), out=tmp_path / "seeds",
                        progress=False)
    assert seen == [(0, ["r=4"]), (1, ["r=4"])]  # each seed replaces the one given
    assert summary.seeds == [0, 1] and len(summary.scores) == 2 and summary.split == "validation"
    assert summary.low <= summary.mean <= summary.high and summary.metric == "accuracy"
    assert json.loads((tmp_path / "seeds" / "seeds.json").read_text())["artifacts"][1].endswith("seed-1/artifact")


def test_overlapping_seed_spreads_are_tied_and_the_cheaper_method_wins():
    assert spreads_overlap([0.80, 0.86], [0.85, 0.90]) and not spreads_overlap([0.70, 0.75], [0.80, 0.9])

    def row(method, family, score, seeds, latency):
        return MethodResult(method, family, "done", metric="accuracy", score=score, ci_low=score - 0.01,
                            ci_high=score + 0.01, n=200, latency_ms=latency, prompt_tokens=50,
                            extra={"seed_scores": seeds})

    big = row("dora", "tuning", 0.90, [0.86, 0.90, 0.93], 300.0)
    small = row("prompt-search", "prompting", 0.87, [0.84, 0.87, 0.88], 100.0)
    pick = recommend([big, small])
    assert pick["method"] == "prompt-search" and set(pick["tied"]) == {"dora", "prompt-search"}
    assert any("across seeds overlap" in r for r in pick["reasons"])
    apart = row("prompt-search", "prompting", 0.80, [0.78, 0.80, 0.81], 100.0)
    assert recommend([big, apart])["method"] == "dora"


def test_the_leaderboards_show_the_seed_mean_range_and_interval_and_name_the_tied(tmp_path):
    from honellm.compare.report import render_report
    from honellm.compare.results import CompareRun, leaderboard_text, summary_text

    def row(method, family, score, seeds, latency):
        summary = summarize_seeds(method, list(range(len(seeds))), seeds, [[1, 0, 1, 1]] * len(seeds))
        return MethodResult(method, family, "done", metric="accuracy", score=score, ci_low=score - 0.01,
                            ci_high=score + 0.01, n=4, latency_ms=latency, prompt_tokens=50,
                            extra={"seed_scores": seeds, "seeds": summary.to_dict()})

    run = CompareRun(tmp_path, {"name": "t", "model": "m", "metric": "accuracy"}, ["dora", "prompt-search", "ia3"],
                     "test", None, None)
    run.results = {"dora": row("dora", "tuning", 0.90, [0.90, 0.86, 0.93], 300.0),
                   "prompt-search": row("prompt-search", "prompting", 0.87, [0.87, 0.84, 0.88], 100.0),
                   "ia3": MethodResult("ia3", "tuning", "failed", reason="the loss became NaN")}
    run.recommendation = recommend(list(run.results.values()))
    text = leaderboard_text(run)
    header = text.splitlines()[0]
    assert "seed mean" in header and "seed range" in header and "seeds 95% CI" in header
    dora = next(line for line in text.splitlines() if line.startswith("dora"))
    ci = run.results["dora"].extra["seeds"]["ci95"]
    assert "0.897" in dora and "0.860-0.930 (sd 0.035)" in dora and f"[{ci[0]:.3f}, {ci[1]:.3f}]" in dora
    assert "ia3" in text and "NaN" in text
    assert ("tied with the best (its 95% interval reaches the best score, or its seed range overlaps the best's): "
            "dora, prompt-search") in summary_text(run)
    page = render_report(run)
    assert "<th>seed range</th>" in page and "<td>done, tied with the best</td>" in page and "0.860-0.930" in page
    alone = CompareRun(tmp_path, run.task, ["dora"], "test", None, None)
    alone.results = {"dora": MethodResult("dora", "tuning", "done", metric="accuracy", score=0.9, n=4)}
    assert "seed mean" not in leaderboard_text(alone) and "seed range" not in render_report(alone)


def test_the_report_plots_each_trial_s_score_against_every_searched_setting(tmp_path):
    import yaml

    from honellm.compare.report import render_report, search_trials
    from honellm.compare.results import CompareRun

    folder = tmp_path / "lora" / "search"
    folder.mkdir(parents=True)
    space = [{"type": "float", "name": "lr", "low": 1e-5, "high": 1e-2, "log": True},
             {"type": "choice", "name": "r", "choices": [4, 8, 16]}]
    (folder / "config.yaml").write_text(yaml.safe_dump({"method": "lora", "space": space}))
    trials = [{"event": "trial", "trial": 0, "params": {"lr": 2e-4, "r": 16}, "state": "complete", "score": 0.8},
              {"event": "trial", "trial": 1, "params": {"lr": 0.009, "r": 4}, "state": "pruned", "score": None},
              {"event": "trial", "trial": 2, "params": {"lr": 1e-3, "r": 8}, "state": "complete", "score": 0.9},
              {"event": "trial", "trial": 3, "params": {"lr": 1e-3, "r": 8}, "state": "failed", "score": None}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials))
    (folder / "best.json").write_text(json.dumps({"best_trial": 2}))
    found, found_space, best = search_trials(tmp_path / "lora")
    assert [t["trial"] for t in found] == [0, 1, 2, 3] and found_space == space and best == 2
    run = CompareRun(tmp_path, {"name": "t", "model": "m", "metric": "accuracy"}, ["lora", "ia3"], "test", None, None)
    run.results = {"lora": MethodResult("lora", "tuning", "done", metric="accuracy", score=0.9, n=4,
                                        run_dir=str(tmp_path / "lora")),
                   "ia3": MethodResult("ia3", "tuning", "done", metric="accuracy", score=0.7, n=4,
                                       run_dir=str(tmp_path / "ia3"))}
    page = render_report(run)
    section = page[page.index("Settings searched"):]
    assert section.count("<svg") == 1 and "<h3>ia3</h3>" not in section  # ia3 did not search: no chart
    assert "lora: 3 trials (2 complete, 1 pruned)" in section and "(trial 2)" in section
    svg = section[section.index("<svg"):section.index("</svg>")]
    assert ">lr<" in svg and ">r<" in svg and 'href="http' not in svg and "<image" not in svg  # nothing fetched


# ------------------------------------------------------------------------------------------------ data.test


def test_a_test_file_replaces_the_test_split_held_out_of_one_file(tmp_path, tiny_model_dir):
    records = [{"text": f"review {i}", "label": "positive" if i % 2 else "negative"} for i in range(20)]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    mine = [{"text": f"held out {i}", "label": "positive"} for i in range(3)]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mine))
    (tmp_path / "task.yaml").write_text(
        f"model: {tiny_model_dir}\ndata: {{file: all.jsonl, split: {{validation: 0.2, test: 0.2}}}}\n"
        "prompt: {template: 'Review: {text}'}\ntarget: label\nchoices: [positive, negative]\n")
    plain = Task.load(tmp_path / "task.yaml")
    given = Task.load(tmp_path / "task.yaml", [f"data.test={tmp_path / 'mine.jsonl'}"])
    assert [r["text"] for r in given.split("test")] == [r["text"] for r in mine]
    assert given.split("train") == plain.split("train") and given.split("validation") == plain.split("validation")
    assert len(plain.split("test")) == 4
    (tmp_path / "no_test.yaml").write_text((tmp_path / "task.yaml").read_text().replace("test: 0.2", "test: 0.0"))
    assert not Task.load(tmp_path / "no_test.yaml").has_split("test")
    added = Task.load(tmp_path / "no_test.yaml", [f"data.test={tmp_path / 'mine.jsonl'}"])
    assert added.has_split("test") and len(added.split("test")) == 3
    with pytest.raises(HoneError, match="train/validation files, not both"):
        Task.load(tmp_path / "task.yaml", [f"data.train={tmp_path / 'mine.jsonl'}"])


# ------------------------------------------------------------------------------------------------ compositions


def _lora_artifact(task, model_dir, path, seed, train_seconds):
    import torch
    from peft import LoraConfig, get_peft_model

    from honellm.models import load
    from honellm.program import PromptProgram

    model, _ = load(str(model_dir), dtype="fp32", device="cpu")
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    art = Artifact.create(name=f"a{seed}", method="lora", kind="adapter", base_model=str(model_dir),
                          program=PromptProgram.from_task(task), task=task,
                          cost={"train_seconds": train_seconds, "train_tokens": 100, "trainable_params": 10})
    art.save(path, model=model)
    return Artifact.load(path), model


@pytest.mark.parametrize("combination", ["linear", "dare_ties"])
def test_merging_two_adapters_gives_one_adapter_with_the_total_cost(task_yaml, tiny_model_dir, tmp_path, combination):
    import torch
    from safetensors.torch import load_file

    from honellm.search.compose import merge_adapters

    task = Task.load(str(task_yaml))
    a, model_a = _lora_artifact(task, tiny_model_dir, tmp_path / "a", 0, 3.0)
    b, model_b = _lora_artifact(task, tiny_model_dir, tmp_path / "b", 1, 4.0)
    merged = merge_adapters(task, [a, b], combination=combination, out=tmp_path / "merged")
    assert merged.kind == "adapter" and merged.manifest.method == f"merge-{combination}"
    assert merged.manifest.cost["train_seconds"] >= 7.0 and merged.manifest.cost["train_tokens"] == 200
    assert set(merged.manifest.cost["parts"]) == {"a0", "a1"}
    weights = load_file(merged.adapter_dir / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    wa = load_file(a.adapter_dir / "adapter_model.safetensors")[key]
    wb = load_file(b.adapter_dir / "adapter_model.safetensors")[key]
    assert weights[key].shape == wa.shape and not torch.equal(weights[key], wa) and not torch.equal(weights[key], wb)
    model, _ = merged.load_model(dtype="fp32", device="cpu")
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    with pytest.raises(HoneError, match="unknown combination"):
        merge_adapters(task, [a, b], combination="average", out=tmp_path / "x")


def test_sft_then_dpo_starts_dpo_from_the_sft_weights_and_counts_both(tiny_model_dir, tmp_path):
    from honellm.search.compose import sft_then_dpo
    from honellm.testing import make_tiny_preference_task

    task = Task.load(str(make_tiny_preference_task(tmp_path / "prefs", tiny_model_dir, n_train=8, n_validation=4)))
    art = sft_then_dpo(task, sft_overrides=["max_steps=1", "r=4", "eval_every=0"],
                       dpo_overrides=["max_steps=1", "r=4", "batch_size=4", "eval_every=0"], out=tmp_path / "c")
    assert art.manifest.method == "lora+dpo" and art.kind == "adapter"
    assert Path(art.base_model).resolve() == (tmp_path / "c" / "sft-merged").resolve()
    sft_cost = Artifact.load(tmp_path / "c" / "sft" / "artifact").manifest.cost
    assert set(art.manifest.cost["parts"]) == {"sft", "dpo"}
    assert art.manifest.cost["train_seconds"] >= sft_cost["train_seconds"] > 0
    assert Artifact.load(tmp_path / "c" / "dpo" / "artifact").manifest.method == "lora+dpo"


def test_dpo_trials_share_one_reference_pass(tiny_model_dir, tmp_path, monkeypatch):
    from honellm.reward.recipes import common
    from honellm.testing import make_tiny_preference_task

    task = Task.load(str(make_tiny_preference_task(tmp_path / "prefs", tiny_model_dir, n_train=8, n_validation=4)))
    passes = []
    original = common.reference_scores
    monkeypatch.setattr(common, "reference_scores", lambda *a, **k: passes.append(1) or original(*a, **k))
    from honellm.reward.recipes import preference

    monkeypatch.setattr(preference, "reference_scores", common.reference_scores)
    out = tmp_path / "search"
    search(task, "dpo", n_trials=2, out=out, progress=False,
           base_overrides=["max_steps=1", "r=4", "batch_size=4", "eval_every=1"],
           space=[Choice("beta", (0.1, 0.3))], enqueue=[{"beta": 0.1}, {"beta": 0.3}])
    assert len(passes) == 1  # the second trial read the first one's reference log-probs
    first, second = (torch.load(out / "trials" / f"trial-00{i}" / "reference_logps.pt") for i in (0, 1))
    assert first["key"] == second["key"]
    # (pairs the one step does not visit are NaN in both)
    torch.testing.assert_close(first["values"]["train"]["chosen"], second["values"]["train"]["chosen"], rtol=0,
                               atol=0, equal_nan=True)
    assert len(list((out / "reference-cache").glob("reference-*.pt"))) == 1


GRPO_FAST = ["max_steps=1", "prompts_per_step=2", "group_size=2", "max_new_tokens=4", "eval_every=0",
             "save_every=0", "r=4"]
RFT_FAST = ["max_steps=1", "max_new_tokens=4", "eval_prompts=0", "min_reward=null", "prompts_per_round=4", "r=4"]


@pytest.fixture(scope="module")
def arithmetic(tiny_model_dir, tmp_path_factory):
    from honellm.testing import make_tiny_reward_task

    return Task.load(str(make_tiny_reward_task(tmp_path_factory.mktemp("arith"), tiny_model_dir, n_train=8,
                                               n_validation=4, max_new_tokens=4)))


def test_grpo_from_sft_starts_grpo_from_the_folded_sft_weights_and_counts_both(arithmetic, tmp_path):
    from honellm.search.compose import grpo_from_sft

    art = grpo_from_sft(arithmetic, sft_overrides=["max_steps=1", "r=4", "eval_every=0"], rl_overrides=GRPO_FAST,
                        out=tmp_path / "c")
    assert art.manifest.method == "lora+grpo" and art.kind == "adapter"
    # the policy's base (and GRPO's reference) is the SFT model, not the task's base
    assert Path(art.base_model).resolve() == (tmp_path / "c" / "sft-merged").resolve()
    assert (tmp_path / "c" / "sft-merged" / "model.safetensors").exists()
    sft_cost = Artifact.load(tmp_path / "c" / "sft" / "artifact").manifest.cost
    assert set(art.manifest.cost["parts"]) == {"sft", "grpo"}
    assert art.manifest.cost["train_seconds"] >= sft_cost["train_seconds"] > 0
    assert art.manifest.cost["train_tokens"] >= sft_cost["train_tokens"] > 0
    assert Artifact.load(tmp_path / "c" / "grpo" / "artifact").manifest.method == "lora+grpo"


def test_rft_from_best_of_n_samples_as_the_artifact_does_from_its_policy(arithmetic, tiny_model_dir, tmp_path):
    import yaml

    from honellm.methods.catalog import method_config, run_method
    from honellm.search.compose import rft_from_best_of_n

    adapter, _ = _lora_artifact(arithmetic, tiny_model_dir, tmp_path / "policy", 0, 6.0)
    spec, config = method_config("best_of_n", None, [f"policy={adapter.path}", "n=3", "temperature=0.7",
                                                     "eval_limit=0"], family="reward")
    bon = run_method(arithmetic, spec, config, out=tmp_path / "bon")
    art = rft_from_best_of_n(arithmetic, bon, rft_overrides=RFT_FAST, out=tmp_path / "c")
    assert art.manifest.method == "best_of_n+rft" and art.kind == "adapter"
    assert art.manifest.inference is None or art.manifest.inference.best_of_n is None  # one sample per request
    # RFT sampled as the best-of-n artifact serves (its n and temperature), from its policy (the adapter folded in)
    used = yaml.safe_load((tmp_path / "c" / "rft" / "config.yaml").read_text())
    used = used["config"]
    assert used["n"] == 3 and used["temperature"] == 0.7 and used["min_reward"] is None
    assert Path(art.base_model).resolve() == (tmp_path / "c" / "policy-merged").resolve()
    assert art.manifest.config["from_best_of_n"] == str(bon.path) and art.manifest.config["best_of_n"]["n"] == 3
    assert set(art.manifest.cost["parts"]) == {"best_of_n", "rft"} and art.manifest.cost["train_seconds"] > 0
    with pytest.raises(HoneError, match="needs a best-of-n artifact"):
        rft_from_best_of_n(arithmetic, adapter, out=tmp_path / "x")


def test_compositions_are_rows_of_compare_that_reuse_rows_and_charge_every_part(tiny_model_dir, tmp_path):
    from honellm.compare.compare import compare
    from honellm.compare.results import leaderboard_text
    from honellm.testing import make_tiny_task

    task = make_tiny_task(tmp_path / "task", tiny_model_dir, n_train=16, n_validation=4)
    fast = {"lora": ["max_steps=1", "batch_size=8", "eval_every=0", "save_every=0", "r=4"], "grpo": GRPO_FAST,
            "prompt-search": ["candidates=1", "max_examples=4", "propose=0", "shots=[2]", "per_query_selectors=[]",
                              "calibrations=[]"]}
    run = compare(str(task), ["grpo-from-sft", "lora+prompt-search", "lora", "sft-then-dpo", "merge-ties"],
                  out=tmp_path / "cmp", method_overrides=fast, progress=False, limit=4)
    rows = run.results
    assert list(rows) == ["lora", "grpo-from-sft", "lora+prompt-search", "sft-then-dpo", "merge-ties"]  # methods first
    assert all(rows[m].status == "done" for m in ("lora", "grpo-from-sft", "lora+prompt-search")), \
        {m: r.reason for m, r in rows.items()}
    assert rows["sft-then-dpo"].status == "skipped" and "preference" in rows["sft-then-dpo"].reason
    lora = rows["lora"]
    composed = rows["lora+prompt-search"]  # on the lora row's adapter, charged at that row's cost
    assert not (tmp_path / "cmp" / "lora+prompt-search" / "lora").exists()
    art = Artifact.load(composed.artifact, verify_base=False)
    assert art.manifest.method == "lora+prompt-search" and art.manifest.config["adapter_from"] == lora.artifact
    assert composed.train_seconds >= lora.train_seconds > 0 and composed.family == "tuning"
    grpo = rows["grpo-from-sft"]
    assert grpo.family == "reward" and Artifact.load(grpo.artifact, verify_base=False).manifest.method == "lora+grpo"
    assert grpo.train_tokens > 0 and grpo.latency_ms > 0 and grpo.n == lora.n == composed.n  # same examples
    merged = rows["merge-ties"]  # the lora row (seed 0) and two more seeds with its settings, merged by TIES
    assert merged.status == "done", merged.reason
    art = Artifact.load(merged.artifact, verify_base=False)
    assert art.manifest.method == "lora-merge-ties" and art.manifest.config["adapters"][0] == lora.artifact
    assert [Path(a).parent.name for a in art.manifest.config["adapters"][1:]] == ["seed-1", "seed-2"]
    assert art.manifest.config["weights"] == [1.0, 1.0, 1.0]  # TIES averages by itself
    assert set(art.manifest.cost["parts"]) == {"a0", "a1", "a2"} and merged.train_seconds > lora.train_seconds
    assert "grpo-from-sft" in leaderboard_text(run)
    from honellm.compare.report import method_metrics

    assert any(m.get("event") == "done" or "loss" in m for m in method_metrics(grpo))  # its GRPO part's run
    with pytest.raises(HoneError, match="unknown method"):
        compare(str(task), ["grpo-from-sfft"], out=tmp_path / "x", progress=False)


def test_rft_from_best_of_n_and_sft_then_dpo_rows(tiny_model_dir, tmp_path):
    from honellm.compare.compare import compare
    from honellm.testing import make_tiny_preference_task, make_tiny_reward_task

    arithmetic = make_tiny_reward_task(tmp_path / "arith", tiny_model_dir, n_train=10, n_validation=4,
                                       max_new_tokens=4)
    run = compare(str(arithmetic), ["rft-from-best-of-n", "best_of_n"], out=tmp_path / "a", progress=False, limit=2,
                  method_overrides={"best_of_n": ["n=2", "eval_limit=0"], "rft": RFT_FAST})
    bon, rft = run.results["best_of_n"], run.results["rft-from-best-of-n"]
    assert bon.status == "done" and rft.status == "done", rft.reason
    art = Artifact.load(rft.artifact, verify_base=False)
    assert art.manifest.method == "best_of_n+rft" and art.manifest.config["from_best_of_n"] == bon.artifact
    assert art.manifest.config["n"] == 2 and rft.train_seconds > 0 and rft.family == "reward"
    prefs = make_tiny_preference_task(tmp_path / "prefs", tiny_model_dir, n_train=10, n_validation=4)
    run = compare(str(prefs), ["sft-then-dpo"], out=tmp_path / "p", progress=False, limit=2,
                  method_overrides={"lora": ["max_steps=1", "r=4", "eval_every=0"],
                                    "dpo": ["max_steps=1", "r=4", "batch_size=4", "eval_every=0"]})
    row = run.results["sft-then-dpo"]
    assert row.status == "done", row.reason
    assert Artifact.load(row.artifact, verify_base=False).manifest.method == "lora+dpo" and row.train_seconds > 0


def test_a_merge_row_reuses_the_lora_row_its_seeds_and_its_searched_settings(task_yaml, tiny_model_dir, tmp_path):
    from honellm.compare.compare import _composition_inputs
    from honellm.compare.results import CompareRun
    from honellm.search.compose import COMPOSITIONS

    task = Task.load(str(task_yaml))
    folder = tmp_path / "cmp" / "lora"
    best, _ = _lora_artifact(task, tiny_model_dir, folder / "search" / "trials" / "trial-002" / "artifact", 0, 2.0)
    seed1, _ = _lora_artifact(task, tiny_model_dir, folder / "seeds" / "seed-1" / "artifact", 1, 3.0)
    (folder / "search" / "best.json").write_text(json.dumps({"best_overrides": ["lr=0.001", "r=4"]}))
    (folder / "seeds" / "seeds.json").write_text(json.dumps({"seeds": [1], "artifacts": [str(seed1.path)]}))
    run = CompareRun(tmp_path / "cmp", {"name": "t"}, ["lora", "merge-linear"], "test", 60.0, None)
    run.results = {"lora": MethodResult("lora", "tuning", "done", score=0.5, artifact=str(best.path),
                                        run_dir=str(folder), train_seconds=40.0)}
    settings, reused = _composition_inputs(COMPOSITIONS["merge-linear"], run, {"lora": ["r=8"]}, 60.0)
    assert reused["lora"].path == best.path and reused["lora"].manifest.cost["train_seconds"] == 40.0  # the row's
    assert list(reused["lora:seeds"]) == [1] and reused["lora:seeds"][1].path == seed1.path
    assert reused["lora:overrides"] == ["lr=0.001", "r=4"]
    assert settings["lora"][0] == "r=8" and "max_seconds=60.0" in settings["lora"]  # nothing else to share with


def test_compare_with_search_judges_the_best_trial_and_charges_the_whole_search(task_yaml, tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    from honellm.compare.compare import compare

    calls = _fake_trials(monkeypatch, tiny_model_dir)
    run = compare(str(task_yaml), ["lora"], out=tmp_path / "cmp", search_trials=2, seeds=2, progress=False, limit=4)
    row = run.results["lora"]
    assert row.status == "done", row.reason
    assert len(calls) == 3 and (tmp_path / "cmp" / "lora" / "search" / "best.json").exists()  # 2 trials, 1 seed
    assert len(row.extra["seed_scores"]) == 2 and row.extra["seed_scores"][0] == row.score
    seeds = row.extra["seeds"]  # the leaderboard's seed figures: the row's run and the other seed, together
    assert seeds["seeds"] == [0, 1] and seeds["scores"] == row.extra["seed_scores"]
    assert seeds["low"] <= seeds["mean"] <= seeds["high"] and len(seeds["ci95"]) == 2
    assert (tmp_path / "cmp" / "lora" / "seeds" / "seed-1" / "eval.json").exists()
    assert (tmp_path / "cmp" / "lora" / "seeds" / "seed-1" / "artifact" / "hone.json").exists()
    assert row.artifact.endswith("artifact") and "/search/trials/trial-" in row.artifact
    assert json.loads((tmp_path / "cmp" / "lora" / "search" / "best.json").read_text())["trials"] == 2


def test_compare_search_runs_prompting_s_own_search_with_three_candidates_per_trial(task_yaml, monkeypatch,
                                                                                    tmp_path):
    from honellm.compare import compare as compare_module

    seen = []

    def run_method(task, spec, config, out, force):
        seen.append(config)
        raise HoneError("stopped here")

    monkeypatch.setattr(study_module, "search", lambda *a, **k: pytest.fail("prompting went through the sampler"))
    monkeypatch.setattr(compare_module, "run_method", run_method)
    row = compare_module._run_one(Task.load(str(task_yaml)), compare_module.all_methods()["prompt-search"],
                                  tmp_path / "p", 600.0, "test", 4, [], False, search_trials=8)
    assert "stopped here" in row.reason
    assert seen[0].candidates == 24 and seen[0].max_seconds == 600.0


def test_failing_trials_are_recorded_and_end_the_search(task_yaml, tmp_path, monkeypatch):
    def run_method(*args, **kwargs):
        raise HoneError("the loss became NaN", fix="lower lr")

    monkeypatch.setattr(study_module, "run_method", run_method)
    with pytest.raises(HoneError, match="no ia3 trial finished"):
        search(Task.load(str(task_yaml)), "ia3", n_trials=2, out=tmp_path / "s", progress=False)
    trials = [r for r in read_metrics(tmp_path / "s" / "metrics.jsonl") if r.get("event") == "trial"]
    assert [r["state"] for r in trials] == ["failed", "failed"] and "NaN" in trials[0]["error"]


def test_prompt_search_on_a_tuned_adapter_keeps_the_adapter_and_the_program_found(task_yaml, tiny_model_dir,
                                                                                  tmp_path):
    from honellm.search.compose import prompt_on_adapter

    task = Task.load(str(task_yaml))
    adapter, _ = _lora_artifact(task, tiny_model_dir, tmp_path / "a", 0, 5.0)
    from honellm.prompting.search import PromptSearchConfig

    config = PromptSearchConfig(candidates=2, max_examples=4, propose=0, shots=[2], per_query_selectors=[],
                                calibrations=[])
    art = prompt_on_adapter(task, adapter, config=config, out=tmp_path / "p", progress=False)
    assert art.kind == "adapter" and art.manifest.method == "lora+prompt-search"
    assert (art.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        adapter.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert art.manifest.cost["train_seconds"] >= 5.0 and set(art.manifest.cost["parts"]) == {"adapter"}
    assert art.manifest.metrics["validation"]["n"] == 4
    assert (tmp_path / "p" / "candidates.csv").exists()


def test_the_python_api_s_prompt_search_samples_shots_selector_and_calibration(task_yaml, tmp_path):
    """`search(task, "prompt-search")`: Optuna over the prompt builder's shots, selector and calibration (compare
    and `hone prompt --search` run prompting's own structured search instead); trials scored on validation."""
    task = Task.load(str(task_yaml))
    out = tmp_path / "prompt"
    result = search(task, "prompt-search", n_trials=2, out=out, progress=False,
                    enqueue=[{"shots": 0, "selector": "random", "calibration": "none"},
                             {"shots": 2, "selector": "balanced", "calibration": "content_free"}])
    trials = [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "trial"]
    assert [t["state"] for t in trials] == ["complete", "complete"]
    assert all(set(t["params"]) == {"shots", "selector", "calibration"} and 0 <= t["score"] <= 1 for t in trials)
    assert result.best_score == max(t["score"] for t in trials)
    assert isinstance(result.artifact, Artifact) and result.artifact.kind == "prompt"
    program = result.artifact.program  # the best trial's program: as many shots (fixed, or chosen per query)
    shots = program.selector.k if program.selector is not None else len(program.demonstrations or [])
    assert shots == result.best_params["shots"]
    assert f"shots={result.best_params['shots']}" in result.best_overrides
