"""evaluate() on the tiny model: every scoring mode, the interval, eval.json, cost, and artifact round trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from honellm.evaluation import EvalResult, bootstrap_ci
from honellm.evaluation.evaluate import evaluate
from honellm.reward.functions import task_reward
from honellm.task import Task


@pytest.fixture(scope="module")
def intents():
    return Task.load("intents")


# ------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = rng.binomial(1, 0.7, 50).astype(float).tolist()
    large = rng.binomial(1, 0.7, 2000).astype(float).tolist()
    lo_s, hi_s = bootstrap_ci(small, seed=0)
    lo_l, hi_l = bootstrap_ci(large, seed=0)
    assert lo_s <= np.mean(small) <= hi_s
    assert lo_l <= np.mean(large) <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s)
    # the normal-approximation width for p = 0.7, n = 2000 is 2 * 1.96 * sqrt(.21 / 2000) ~ 0.040
    assert hi_l - lo_l == pytest.approx(2 * 1.96 * math.sqrt(0.7 * 0.3 / 2000), rel=0.15)


def test_bootstrap_is_seeded_and_handles_edges():
    scores = [0.0, 1.0, 1.0, 0.0, 1.0]
    assert bootstrap_ci(scores, seed=3) == bootstrap_ci(scores, seed=3)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert bootstrap_ci([0.4]) == (0.4, 0.4)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


# ------------------------------------------------------------------------------------------------ modes


def test_choices_mode_reports_acc_and_acc_norm(tiny_model, tiny_model_dir, intents):
    model, tok = tiny_model
    result = evaluate(str(tiny_model_dir), intents, "validation", limit=6, model=model, tokenizer=tok, progress=False)
    assert result.mode == "choices" and result.metric == "accuracy" and result.n == 6
    assert {"acc", "acc_norm", "calibrated", "predicted_label_share"} <= set(result.extras)
    assert result.score == pytest.approx(result.extras["acc"])
    assert result.ci95[0] <= result.score <= result.ci95[1]
    for rec in result.records:
        logprobs = rec.details["choice_logprobs"]
        assert set(logprobs) == set(intents.config.choices)
        assert rec.prediction == max(logprobs, key=logprobs.get)  # the prediction is the most likely label
        assert rec.score == float(rec.prediction == rec.reference)


def test_calibration_offsets_change_the_prediction(tiny_model, tiny_model_dir, intents):
    from honellm.artifact import Artifact

    model, tok = tiny_model
    art = Artifact.zero_shot(str(tiny_model_dir), intents)
    plain = evaluate(art, intents, "validation", limit=6, model=model, tokenizer=tok, progress=False)
    # a huge offset for one label makes it the prediction everywhere
    art.program.calibration = {c: (100.0 if c == "cancel" else 0.0) for c in intents.config.choices}
    forced = evaluate(art, intents, "validation", limit=6, model=model, tokenizer=tok, progress=False)
    assert all(r.prediction == "cancel" for r in forced.records)
    assert forced.extras["calibrated"] and forced.extras["acc_uncalibrated"] == plain.extras["acc"]
    # the raw log-probs do not depend on calibration
    assert [r.details["choice_logprobs"] for r in forced.records] == [r.details["choice_logprobs"] for r in plain.records]


def test_choice_scores_are_the_answer_turns_loglikelihood(tiny_model, tiny_model_dir, intents):
    """Check one choice's log-prob against a direct forward pass over prompt + label + end of turn."""
    import torch

    from honellm.data.chat import render_prompt
    from honellm.program import PromptProgram

    model, tok = tiny_model
    result = evaluate(str(tiny_model_dir), intents, "validation", limit=1, model=model, tokenizer=tok, progress=False)
    record = intents.split("validation")[0]
    prompt = render_prompt(tok, PromptProgram.from_task(intents).messages(intents, record))
    assert result.records[0].prompt == prompt
    a = tok(prompt, add_special_tokens=False).input_ids
    b = tok("billing<|im_end|>", add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([a + b])).logits[0].float(), -1)
    expected = sum(logp[len(a) - 1 + i, t].item() for i, t in enumerate(b))
    assert result.records[0].details["choice_logprobs"]["billing"] == pytest.approx(expected, abs=1e-3)


def test_both_ways_of_scoring_groups_agree(tiny_model, intents, monkeypatch):
    """score_groups reads each context once (one call per context) or all pairs in one call; same numbers."""
    from honellm.data.chat import render_prompt
    from honellm.evaluation import scoring
    from honellm.generation import Generator
    from honellm.program import PromptProgram

    model, tok = tiny_model
    program = PromptProgram.from_task(intents)
    records = intents.split("validation")[:3]
    ctx = scoring.EvalContext(task=intents, program=program, artifact=None, model=model, tokenizer=tok,
                              generator=Generator(model, tok), records=records, demonstrations=None)
    contexts = [render_prompt(tok, program.messages(intents, r)) for r in records]
    groups = [["billing<|im_end|>", "cancel<|im_end|>", "shipping<|im_end|>"]] * 3
    shared = scoring.shared_prefix_text(tok, program, contexts)
    assert shared and all(c.startswith(shared) for c in contexts)
    calls = []
    real_score = ctx.generator.score_continuations
    monkeypatch.setattr(ctx.generator, "score_continuations", lambda *a, **k: calls.append(1) or real_score(*a, **k))
    per_context = scoring.score_groups(ctx, contexts, groups, shared_prefix=shared)  # the system turn is short
    assert len(calls) == 3
    # pretend the shared prefix were nearly the whole context: one call for all pairs is then cheaper
    monkeypatch.setattr(scoring, "count_tokens", lambda tokenizer, texts: [100 if t == shared else 101 for t in texts])
    flat = scoring.score_groups(ctx, contexts, groups, shared_prefix=shared)
    assert len(calls) == 4
    assert per_context[1] == flat[1]
    assert np.allclose(per_context[0], flat[0], atol=1e-4)


def test_text_mode_generates(tiny_model, tiny_model_dir):
    model, tok = tiny_model
    task = Task.load("arithmetic", ["rewards=[]", "generation.max_new_tokens=4"])
    assert task.metric == "numeric_match"
    result = evaluate(str(tiny_model_dir), task, "validation", limit=3, model=model, tokenizer=tok, progress=False)
    assert result.mode == "text" and result.metric == "numeric_match" and result.n == 3
    assert result.cost.completion_tokens_per_example is not None
    assert result.cost.completion_tokens_per_example <= 4
    assert all(r.reference is not None for r in result.records)


def test_reward_mode_scores_generated_text_with_the_tasks_rewards(tiny_model, tiny_model_dir):
    model, tok = tiny_model
    task = Task.load("arithmetic", ["metric=reward_mean", "generation.max_new_tokens=4"])
    result = evaluate(str(tiny_model_dir), task, "validation", limit=3, model=model, tokenizer=tok, progress=False)
    assert result.mode == "reward" and result.n == 3
    assert {"reward_mean", "reward_pass_rate", "reward_unscored", "reward/numeric_match"} <= set(result.extras)
    # the rewards agree with the reward functions called directly on the same text
    direct = task_reward(task)([r.prompt for r in result.records], [r.prediction for r in result.records],
                           target=[r.reference for r in result.records])
    assert [r.score for r in result.records] == [0.0 if math.isnan(d) else d for d in direct]


def test_text_metric_on_a_task_with_rewards_also_reports_them(tiny_model, tiny_model_dir):
    model, tok = tiny_model
    task = Task.load("arithmetic", ["generation.max_new_tokens=4"])
    result = evaluate(str(tiny_model_dir), task, "validation", limit=2, model=model, tokenizer=tok, progress=False)
    assert result.mode == "text" and "reward_mean" in result.extras


def test_perplexity_mode(tiny_model, tiny_model_dir, intents):
    model, tok = tiny_model
    task = Task.load("intents", ["metric=perplexity", "choices=null"])
    result = evaluate(str(tiny_model_dir), task, "validation", limit=4, model=model, tokenizer=tok, progress=False)
    assert result.mode == "nll" and not result.higher_is_better
    nll = sum(r.details["nll"] for r in result.records)
    tokens = sum(r.details["tokens"] for r in result.records)
    assert result.extras["corpus_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-3)
    assert result.score == pytest.approx(np.mean([math.exp(r.details["nll"] / r.details["tokens"]) for r in result.records]),
                                         rel=1e-3)
    # a random 384-token model is near-uniform: perplexity of the order of the vocabulary
    assert 50 < result.extras["corpus_perplexity"] < 5000


def test_preference_mode(tiny_model, tiny_model_dir):
    model, tok = tiny_model
    task = Task.load("support_prefs")
    result = evaluate(str(tiny_model_dir), task, "validation", limit=4, model=model, tokenizer=tok, progress=False)
    assert result.mode == "preference" and result.metric == "preference_accuracy"
    assert result.extras["preference_scorer"] == "loglik_margin"
    for r in result.records:
        assert r.score == float(r.details["margin"] > 0)
        assert r.prediction == ("chosen" if r.details["margin"] > 0 else "rejected")


def test_preference_scorer_registry_by_method_then_kind(tiny_model_dir):
    from honellm.artifact import Artifact
    from honellm.evaluation.preference import PREFERENCE_SCORERS, register_preference_scorer
    from honellm.evaluation.preference import preference_scorer_for as scorer_for

    art = Artifact.zero_shot(str(tiny_model_dir))
    assert scorer_for(art).__name__ == "loglik_margin"
    with pytest.raises(ValueError, match="twice"):
        register_preference_scorer("adapter")(lambda ctx, batch: [])
    try:
        register_preference_scorer("zero-shot")(scorer := (lambda ctx, batch: []))
        assert scorer_for(art) is scorer  # the method wins over the kind
    finally:
        PREFERENCE_SCORERS.pop("zero-shot", None)


def test_dpo_implicit_margins_are_zero_for_an_identity_adapter(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from honellm.artifact import Artifact
    from honellm.evaluation.preference import PreferenceBatch, dpo_implicit_margins
    from honellm.evaluation.scoring import EvalContext
    from honellm.generation import Generator
    from honellm.models import load


    model, tok = load(tiny_model_dir, dtype="fp32", device="cpu")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=True))
    art = Artifact.zero_shot(str(tiny_model_dir))
    ctx = EvalContext(task=None, program=art.program, artifact=art, model=peft_model, tokenizer=tok,
                      generator=Generator(peft_model, tok), records=[], demonstrations=None)
    batch = PreferenceBatch([[{"role": "user", "content": "hi"}]] * 2, ["yes", "a"], ["no", "b"])
    assert dpo_implicit_margins(ctx, batch, beta=0.1) == pytest.approx([0.0, 0.0], abs=1e-5)
    # a non-identity adapter moves the policy away from the reference
    peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.data.normal_(0, 1.0)
    assert any(abs(m) > 1e-4 for m in dpo_implicit_margins(ctx, batch, beta=0.1))


# ------------------------------------------------------------------------------------------------ results, cost, files


def test_eval_json_content_and_round_trip(tiny_model, tiny_model_dir, intents, tmp_path):
    model, tok = tiny_model
    result = evaluate(str(tiny_model_dir), intents, "validation", limit=5, model=model, tokenizer=tok, progress=False,
                      seed=7)
    path = result.save(tmp_path)
    assert path == tmp_path / "eval.json"
    data = json.loads(path.read_text())
    for key in ("task", "split", "metric", "score", "ci95", "n", "mode", "extras", "cost", "artifact", "config", "records"):
        assert key in data
    assert data["n"] == 5 and data["split"] == "validation" and data["config"]["seed"] == 7
    assert len(data["records"]) == 5
    assert {"index", "prompt", "prediction", "reference", "score", "details"} <= set(data["records"][0])
    cost = data["cost"]
    assert cost["prompt_tokens_per_example"] > 0 and cost["wall_seconds"] > 0 and cost["examples_per_second"] > 0
    assert cost["peak_memory_mb"] > 0 and cost["memory_kind"].startswith("cpu_rss")
    again = EvalResult.load(tmp_path)
    assert again.score == result.score and again.ci95 == result.ci95 and again.records[0] == result.records[0]


def test_limit_takes_the_first_records(tiny_model, tiny_model_dir, intents):
    model, tok = tiny_model
    a = evaluate(str(tiny_model_dir), intents, "validation", limit=3, model=model, tokenizer=tok, progress=False)
    b = evaluate(str(tiny_model_dir), intents, "validation", limit=5, model=model, tokenizer=tok, progress=False)
    assert [r.prompt for r in a.records] == [r.prompt for r in b.records[:3]]
    assert [r.score for r in a.records] == [r.score for r in b.records[:3]]


def test_saved_artifact_evaluates_to_the_same_score(tiny_model_dir, intents, tmp_path):
    from honellm.artifact import Artifact
    from honellm.program import Demonstration, PromptProgram

    program = PromptProgram(system="Route the message.", template="Message: {text}",
                            demonstrations=[Demonstration(query="Message: my card was charged twice", answer="billing")],
                            calibration={"billing": -0.5})
    art = Artifact.create(name="t", method="prompt", base_model=str(tiny_model_dir), program=program, task=intents)
    before = evaluate(art, intents, "validation", limit=6, progress=False)
    art.save(tmp_path / "art")
    after = evaluate(str(tmp_path / "art"), intents, "validation", limit=6, progress=False)
    assert after.score == before.score
    assert [r.details["choice_logprobs"] for r in after.records] == [r.details["choice_logprobs"] for r in before.records]
    assert after.artifact["path"] == str(tmp_path / "art")


def test_training_mode_is_restored(tiny_model_dir, intents):
    from honellm.models import load

    model, tok = load(tiny_model_dir, dtype="fp32", device="cpu")
    model.train()
    evaluate(str(tiny_model_dir), intents, "validation", limit=2, model=model, tokenizer=tok, progress=False)
    assert model.training


def test_errors_are_user_errors(tiny_model_dir, intents, tiny_model):
    from honellm.errors import HoneError

    model, tok = tiny_model
    with pytest.raises(HoneError, match="has no test split"):
        evaluate(str(tiny_model_dir), Task.load("support_prefs", ["data.test=null"]), "test", model=model, tokenizer=tok)
    task = Task.load("arithmetic", ["metric=reward_mean", "rewards=[]"])
    with pytest.raises(HoneError, match="needs reward functions"):
        evaluate(str(tiny_model_dir), task, "validation", limit=1, model=model, tokenizer=tok, progress=False)


def test_evaluate_to_folder_scores_a_held_out_file_on_a_task_that_splits_one_file(tiny_model_dir, tmp_path):
    from honellm.artifact import Artifact
    from honellm.errors import HoneError
    from honellm.evaluation.evaluate import evaluate_to_folder

    records = [{"text": f"review {i}", "label": "positive" if i % 2 else "negative"} for i in range(20)]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "task.yaml").write_text(
        f"model: {tiny_model_dir}\ndata: {{file: all.jsonl, split: {{validation: 0.2, test: 0.2}}}}\n"
        "prompt: {template: 'Review: {text}'}\ntarget: label\nchoices: [positive, negative]\n")
    task = Task.load(str(tmp_path / "task.yaml"))
    art = Artifact.zero_shot(str(tiny_model_dir), task).save(tmp_path / "art")
    mine = [{"text": "held out", "label": "positive"}, {"text": "another", "label": "negative"}]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mine))
    result, path = evaluate_to_folder(str(art), data=tmp_path / "mine.jsonl", progress=False)
    assert result.n == 2 and path == art / "eval-mine.json" and path.exists()
    assert [e.reference for e in result.records] == ["positive", "negative"]
    with pytest.raises(HoneError, match="already exists"):
        evaluate_to_folder(str(art), data=tmp_path / "mine.jsonl", progress=False)
    with pytest.raises(HoneError, match="evaluated as the test split"):
        evaluate_to_folder(str(art), data=tmp_path / "mine.jsonl", split="validation", progress=False, force=True)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine", "label": "positive"}\n{"text": "cut off"\n')
    with pytest.raises(HoneError) as err:
        evaluate_to_folder(str(art), data=tmp_path / "bad.jsonl", progress=False)
    assert f"{tmp_path / 'bad.jsonl'}:2: not valid JSON" in err.value.render()
