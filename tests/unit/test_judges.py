"""Judges: option probabilities from a local model or an endpoint, order-debiased preferences, calibration and its
bars, the judge reward and the judge_win_rate metric."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from honellm.errors import HoneError
from honellm.evaluation.evaluate import evaluate
from honellm.evaluation.judges import (
    EndpointBackend,
    Judge,
    JudgeConfig,
    calibrate,
    calibrated_judge,
    judge_config,
    read_pairs,
)
from honellm.reward.functions import build_reward
from honellm.task import Task
from honellm.testing import make_tiny_task


class RuleBackend:
    """A judge whose verdict is a rule on the rendered prompt: `pick(text) -> option index`, with probability 0.9."""

    def __init__(self, pick):
        self.pick, self.seen = pick, []

    def option_logprobs(self, conversations, options):
        out = np.full((len(conversations), len(options)), np.log(0.1 / (len(options) - 1)))
        for i, conversation in enumerate(conversations):
            text = conversation[-1]["content"]
            self.seen.append(text)
            out[i, self.pick(text, options)] = np.log(0.9)
        return out


def _answers(text):
    a = text.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
    b = text.split("[Answer B]\n")[1].split("\n\nReply")[0]
    return a, b


PAIRS = [{"prompt": f"q{i}", "chosen": "good " + "x" * (i % 3), "rejected": "bad " + "y" * ((i + 1) % 5)}
         for i in range(12)]


def test_a_judge_that_reads_the_answers_agrees_and_has_no_position_bias():
    judge = Judge(JudgeConfig(model="rule"), RuleBackend(lambda t, o: 0 if "good" in _answers(t)[0] else 1))
    calibration = calibrate(judge, PAIRS)
    assert calibration.pairs == 12 and calibration.agreement == 1.0 and calibration.position_bias == 0.0
    assert calibration.first_position_rate == 0.5
    assert calibration.agreement_ci == (1.0, 1.0)
    calibration.check(JudgeConfig(model="rule"))  # passes the bars
    p = judge.prefer(["q"], ["good"], ["bad"])
    assert p[0] == pytest.approx(0.9)


def test_a_judge_that_always_says_a_is_refused_unless_forced():
    judge = Judge(JudgeConfig(model="rule"), RuleBackend(lambda t, o: 0))
    calibration = calibrate(judge, PAIRS)
    # both orders pick the first position: the debiased verdict is a tie on every pair
    assert calibration.position_bias == 1.0 and calibration.first_position_rate == 1.0
    assert calibration.agreement == 0.5
    with pytest.raises(HoneError, match="position bias 1.00 > max_position_bias"):
        calibration.check(JudgeConfig(model="rule"))
    calibration.check(JudgeConfig(model="rule", force=True))
    assert judge.prefer(["q"], ["x"], ["y"])[0] == pytest.approx(0.5)  # position bias cancels in prefer


def test_length_bias_is_the_judges_excess_preference_for_longer_answers():
    longer = Judge(JudgeConfig(model="rule"),
                   RuleBackend(lambda t, o: 0 if len(_answers(t)[0]) > len(_answers(t)[1]) else 1))
    pairs = [{"prompt": "q", "chosen": "short", "rejected": "a much longer answer"}] * 3 + \
            [{"prompt": "q", "chosen": "a much longer answer", "rejected": "short"}]
    calibration = calibrate(longer, pairs)
    assert calibration.judge_prefers_longer == 1.0 and calibration.labels_prefer_longer == 0.25
    assert calibration.length_bias == pytest.approx(0.75)
    assert calibration.agreement == 0.25


def test_pointwise_score_is_the_expected_rating_scaled():
    judge = Judge(JudgeConfig(model="rule", mode="pointwise", scale=5), RuleBackend(lambda t, o: 4))
    # P(5) = 0.9, P(1..4) = 0.025 each: E = 0.025 * (1 + 2 + 3 + 4) + 4.5 = 4.75 -> (4.75 - 1) / 4
    assert judge.score(["q"], ["a"])[0] == pytest.approx(0.9375)


def test_local_judge_on_a_tiny_model(tiny_model_dir):
    judge = Judge.load({"model": str(tiny_model_dir)})
    forward = judge.first_wins(["What is 2 + 3?"] * 2, ["5", "seven"], ["seven", "5"])
    assert forward.shape == (2,) and ((forward > 0) & (forward < 1)).all()
    both = judge.prefer(["What is 2 + 3?"], ["5"], ["seven"]) + judge.prefer(["What is 2 + 3?"], ["seven"], ["5"])
    assert both[0] == pytest.approx(1.0)  # prefer(x, y) + prefer(y, x) = 1
    scores = Judge.load({"model": str(tiny_model_dir), "mode": "pointwise"}).score(["q", "q"], ["a", "b"])
    assert ((scores >= 0) & (scores <= 1)).all()


def _endpoint(handler):
    def route(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "judge-model"}]})
        body = json.loads(request.content)
        assert body["max_tokens"] == 1 and body["logprobs"] is True and body["model"] == "judge-model"
        return httpx.Response(200, json=handler(body))
    return EndpointBackend("http://judge.test/v1", transport=httpx.MockTransport(route))


def test_endpoint_judge_reads_top_logprobs_and_falls_back_to_the_text():
    with_logprobs = _endpoint(lambda body: {"choices": [{"message": {"content": "B"}, "logprobs": {"content": [
        {"token": "B", "logprob": np.log(0.7), "top_logprobs": [{"token": "B", "logprob": np.log(0.7)},
                                                                 {"token": " A", "logprob": np.log(0.2)},
                                                                 {"token": "C", "logprob": np.log(0.1)}]}]}}]})
    judge = Judge(JudgeConfig(model="http://judge.test/v1"), with_logprobs)
    assert judge.first_wins(["q"], ["x"], ["y"])[0] == pytest.approx(0.2 / 0.9)
    text_only = _endpoint(lambda body: {"choices": [{"message": {"content": "A, because"}, "logprobs": None}]})
    assert Judge(JudgeConfig(model="http://judge.test/v1"), text_only).first_wins(["q"], ["x"], ["y"])[0] == 1.0
    neither = _endpoint(lambda body: {"choices": [{"message": {"content": "no idea"}}]})
    assert Judge(JudgeConfig(model="http://judge.test/v1"), neither).first_wins(["q"], ["x"], ["y"])[0] == 0.5


def test_endpoint_errors_are_clear():
    failing = EndpointBackend("http://judge.test/v1", model="m",
                              transport=httpx.MockTransport(lambda r: httpx.Response(401, text="bad key")))
    with pytest.raises(HoneError, match="answered 401"):
        failing.option_logprobs([[{"role": "user", "content": "x"}]], ["A", "B"])
    with pytest.raises(HoneError, match="did not list a model"):
        EndpointBackend("http://judge.test/v1", transport=httpx.MockTransport(lambda r: httpx.Response(500)))


def test_config_and_pairs_errors(tmp_path):
    with pytest.raises(HoneError, match="rubrik"):
        judge_config({"model": "m", "rubrik": "x"})
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c"}\n')
    with pytest.raises(HoneError, match="lacks rejected") as err:
        read_pairs(bad)
    assert err.value.where.endswith("pairs.jsonl:2")
    assert len(read_pairs(bad, limit=1)) == 1


def test_calibration_bars_apply_when_the_config_names_pairs(tiny_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    config = {"model": str(tiny_model_dir), "calibration": "pairs.jsonl", "min_agreement": 1.0,
              "max_position_bias": 0.0}
    with pytest.raises(HoneError, match="failed calibration on 12 pairs"):
        calibrated_judge(config, base_dir=tmp_path)
    judge, calibration = calibrated_judge({**config, "force": True}, base_dir=tmp_path)
    assert calibration.pairs == 12 and 0 <= calibration.agreement <= 1


def test_judge_reward_loads_lazily_and_scores(tiny_model_dir, tmp_path):
    reward = build_reward([{"name": "judge", "judge": {"model": str(tiny_model_dir), "mode": "pointwise"}}])
    scores = reward.functions[0](prompts=["q1", "q2"], completions=["a", "b"])
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)
    pairwise = build_reward([{"name": "judge", "judge": str(tiny_model_dir)}])
    prefs = pairwise.functions[0](prompts=["q"], completions=["a"], target=["b"])
    assert 0 < prefs[0] < 1
    with pytest.raises(HoneError, match="judge"):
        build_reward([{"name": "judge", "judge": {"modl": "x"}}])


def test_judge_win_rate_metric_through_evaluate(tiny_model_dir, tmp_path):
    task_file = make_tiny_task(tmp_path / "task", tiny_model_dir, n_validation=6)
    task = Task.load(task_file, ["metric=judge_win_rate", "choices=null",
                                 f"judge.model={tiny_model_dir}", "generation.max_new_tokens=4"])
    result = evaluate(str(tiny_model_dir), task, "validation")
    assert result.metric == "judge_win_rate" and 0 <= result.score <= 1
    assert result.n == 6 and result.mode == "judge" and "judge_preference" in result.records[0].details
    low, high = result.ci95
    assert low <= result.score <= high
