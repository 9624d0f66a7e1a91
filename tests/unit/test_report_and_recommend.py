import json

from honellm.compare.recommend import recommend
from honellm.compare.report import pareto_front, render_report, write_report
from honellm.compare.results import CompareRun, MethodResult


def result(method, family, score, lo, hi, latency, train=0.0, tokens=60.0, **kw):
    return MethodResult(method, family, "done", metric="accuracy", score=score, ci_low=lo, ci_high=hi, n=100,
                        latency_ms=latency, prompt_tokens=tokens, train_seconds=train, **kw)


def test_pareto_front():
    points = [(1, 0.5), (2, 0.7), (3, 0.6), (0.5, 0.4), (4, 0.9)]
    assert sorted(pareto_front(points)) == [0, 1, 3, 4]


def test_recommend_prefers_the_cheaper_of_tied_methods():
    results = [
        result("zero-shot", "prompting", 0.60, 0.50, 0.70, 40),
        result("few-shot", "prompting", 0.86, 0.79, 0.92, 120, tokens=400),
        result("lora", "tuning", 0.90, 0.84, 0.95, 40, train=120, trainable_params=1000),
        result("dpo", "reward", 0.70, 0.61, 0.79, 40, train=300),
        MethodResult("grpo", "reward", "skipped", reason="no reward functions"),
    ]
    rec = recommend(results)
    assert rec["method"] == "lora"
    assert set(rec["tied"]) == {"lora", "few-shot"}
    text = " ".join(rec["reasons"])
    assert "gain over zero-shot: +0.300" in text and "grpo (no reward functions)" in text
    # When the tied cheaper method is cheaper to serve, it wins.
    results[1] = result("few-shot", "prompting", 0.88, 0.80, 0.93, 30, tokens=50)
    assert recommend(results)["method"] == "few-shot"
    assert recommend([MethodResult("x", "tuning", "failed", reason="boom")]) is None


def make_run(tmp_path):
    run = CompareRun(tmp_path, {"name": "intents", "metric": "accuracy", "model": "tiny"}, ["zero-shot", "lora", "grpo"],
                     "test", 300.0, None)
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    with open(lora_dir / "metrics.jsonl", "w") as f:
        for step in range(1, 11):
            f.write(json.dumps({"step": step, "loss": 3.0 / step, "kind": "train"}) + "\n")
    grpo_dir = tmp_path / "grpo"
    grpo_dir.mkdir()
    with open(grpo_dir / "metrics.jsonl", "w") as f:
        for step in range(0, 50, 10):
            f.write(json.dumps({"kind": "guard", "step": step, "proxy": step / 50, "gold": 0.5 - step / 200, "kl": step / 100,
                                "mean_length": 20 + step, "distinct_n": 0.9, "entropy": 1.0}) + "\n")
        f.write(json.dumps({"kind": "alarm", "step": 30, "alarm": "proxy_gold_divergence", "message": "proxy up, gold down"}) + "\n")
        f.write(json.dumps({"kind": "guard_summary", "best_step": 10}) + "\n")
    for name, preds in (("zero-shot", ["billing", "cancel"]), ("lora", ["billing", "shipping"])):
        (tmp_path / f"{name}.eval.json").write_text(json.dumps({"records": [
            {"prompt": "refund me", "reference": "billing", "prediction": preds[0], "score": 1.0},
            {"prompt": "where is my parcel", "reference": "shipping", "prediction": preds[1],
             "score": float(preds[1] == "shipping")}]}))
    run.results = {
        "zero-shot": result("zero-shot", "prompting", 0.40, 0.30, 0.50, 30, eval_path=str(tmp_path / "zero-shot.eval.json")),
        "lora": result("lora", "tuning", 0.90, 0.84, 0.95, 30, train=100, run_dir=str(lora_dir),
                       eval_path=str(tmp_path / "lora.eval.json")),
        "grpo": result("grpo", "reward", 0.50, 0.40, 0.60, 30, train=200, run_dir=str(grpo_dir)),
    }
    run.recommendation = recommend(list(run.results.values()))
    run.save()
    return run


def test_report_holds_leaderboard_figures_guard_and_disagreements(tmp_path):
    make_run(tmp_path)
    path = write_report(tmp_path)
    page = path.read_text()
    assert "<h2>Leaderboard</h2>" in page and "<td>lora</td>" in page and "[0.840, 0.950]" in page
    assert "Use lora" in page
    assert page.count("data:image/png;base64,") >= 3  # quality/cost, learning curves, guard panel
    assert "proxy_gold_divergence" in page and "kept checkpoint: step 10" in page
    assert "Where the methods disagree" in page and "where is my parcel" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_report_of_a_run_with_nothing_finished(tmp_path):
    run = CompareRun(tmp_path, {"name": "t", "metric": "accuracy"}, ["lora"], "test", None, None)
    run.results = {"lora": MethodResult("lora", "tuning", "failed", reason="out of memory")}
    run.save()
    page = render_report(CompareRun.load(tmp_path))
    assert "nothing to recommend" in page and "out of memory" in page


def test_combined_report_holds_every_run_with_a_summary(tmp_path):
    from honellm.compare.report import write_combined_report

    (tmp_path / "a").mkdir()
    make_run(tmp_path / "a")
    other = CompareRun(tmp_path / "b", {"name": "prefs", "metric": "preference_accuracy", "model": "tiny"},
                       ["zero-shot", "dpo"], "test", None, None)
    other.results = {"zero-shot": result("zero-shot", "prompting", 0.5, 0.4, 0.6, 20),
                     "dpo": result("dpo", "reward", 0.8, 0.7, 0.9, 20, train=50)}
    other.recommendation = recommend(list(other.results.values()))
    (tmp_path / "b").mkdir()
    other.save()
    page = write_combined_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report.html", intro="two tasks").read_text()
    assert "<h2>Summary</h2>" in page and "Task: intents" in page and "Task: prefs" in page
    assert page.count("<h2>Leaderboard</h2>") == 2 and "<td>dpo</td><td>0.800</td><td>0.500</td>" in page
