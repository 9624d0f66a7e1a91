"""Every registered metric against values computed by hand."""

from __future__ import annotations

import math

import pytest

from honellm.evaluation.metrics import METRICS, normalize_text, parse_number, register_metric


def run(name, **kwargs):
    return METRICS[name].fn(**kwargs)


def test_every_metric_is_tested_here():
    tested = {"accuracy", "exact_match", "token_f1", "rouge_l", "numeric_match", "choice_accuracy", "reward_mean",
              "reward_pass_rate", "reward_model_score", "preference_accuracy", "perplexity", "judge_win_rate"}
    assert set(METRICS) == tested


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="twice"):
        register_metric("accuracy")(lambda predictions, references, **_: [])


def test_normalize_text_follows_squad():
    assert normalize_text("  The  Cat, sat! ") == "cat sat"
    assert normalize_text("An apple a day") == "apple day"
    assert normalize_text("Théâtre") == "théâtre"


def test_accuracy_reads_the_first_line_normalised():
    preds = ["Positive.", "negative\nbecause it is dull", "  POSITIVE  ", "neutral"]
    refs = ["positive", "negative", "positive", "negative"]
    assert run("accuracy", predictions=preds, references=refs) == [1.0, 1.0, 1.0, 0.0]


def test_accuracy_empty_prediction_is_wrong():
    assert run("accuracy", predictions=[""], references=["positive"]) == [0.0]


def test_exact_match_normalises_unless_told_not_to():
    assert run("exact_match", predictions=["The Eiffel Tower!"], references=["eiffel tower"]) == [1.0]
    assert run("exact_match", predictions=["The Eiffel Tower!"], references=["eiffel tower"], lower=False) == [0.0]
    assert run("exact_match", predictions=["Paris"], references=["London"]) == [0.0]


def test_token_f1_by_hand():
    # pred tokens [cat, sat, on, mat], ref [cat, on, mat, today]: common 3, P = 3/4, R = 3/4, F1 = 0.75
    assert run("token_f1", predictions=["the cat sat on the mat"], references=["cat on a mat today"]) == [0.75]
    # repeated tokens count with multiplicity: pred [a1, a1, b], ref [a1, b, b] -> common 2, P = R = 2/3
    assert run("token_f1", predictions=["a1 a1 b"], references=["a1 b b"])[0] == pytest.approx(2 / 3)
    assert run("token_f1", predictions=["x"], references=["y"]) == [0.0]
    # both empty after normalisation counts as a match; one empty does not
    assert run("token_f1", predictions=["the"], references=["a"]) == [1.0]
    assert run("token_f1", predictions=[""], references=["cat"]) == [0.0]


def test_rouge_l_by_hand():
    # pred [the, cat, sat, on, the, mat] (6), ref [the, cat, is, on, the, mat] (6): LCS [the, cat, on, the, mat] = 5
    # P = R = 5/6 -> F = 5/6
    got = run("rouge_l", predictions=["The cat sat on the mat"], references=["the cat is on the mat"])[0]
    assert got == pytest.approx(5 / 6)
    # pred [a, b] ref [a, b, c, d]: LCS 2, P = 1, R = 1/2, F1 = 2/3; with beta = 2: 5*1*0.5 / (0.5 + 4*1) = 5/9
    assert run("rouge_l", predictions=["a b"], references=["a b c d"])[0] == pytest.approx(2 / 3)
    assert run("rouge_l", predictions=["a b"], references=["a b c d"], beta=2.0)[0] == pytest.approx(5 / 9)
    assert run("rouge_l", predictions=["x y"], references=["a b"]) == [0.0]


@pytest.mark.parametrize("text, value", [
    ("so she has #### 72", 72.0),
    ("The answer is 1,234.", 1234.0),
    ("It costs $18.50 in total", 18.5),
    ("first 3 then 4 then 5", 5.0),
    ("#### -3", -3.0),
    ("x = -2", -2.0),
    ("between 10-15 apples", 15.0),  # a dash after a digit is a range, not a minus sign
    ("half is .5", 0.5),
    ("Step 1: 2 + 2 = 4\n#### 4\nThen 99", 4.0),  # the #### marker wins over the last number
    ("no numbers here", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_numeric_match_by_hand():
    preds = ["She pays 18 dollars. #### 18", "the result is 7", "3.0", "about 5", "no idea"]
    refs = ["Janet ... #### 18", "8", "#### 3", "5.0000001", "4"]
    assert run("numeric_match", predictions=preds, references=refs) == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert run("numeric_match", predictions=["5.1"], references=["5"], tolerance=0.05) == [1.0]


def test_choice_accuracy_sum_and_length_normalised():
    # choice 0: logprob -2 over 1 token; choice 1: -3 over 6 tokens. acc picks 0 (-2 > -3); acc_norm picks 1 (-0.5 > -2).
    logprobs, lengths = [[-2.0, -3.0]], [[1, 6]]
    assert run("choice_accuracy", choice_logprobs=logprobs, choice_lengths=lengths, references=[1]) == [1.0]
    assert run("choice_accuracy", choice_logprobs=logprobs, choice_lengths=lengths, references=[1], normalize=False) == [0.0]
    # ties go to the first choice
    assert run("choice_accuracy", choice_logprobs=[[-1.0, -1.0]], choice_lengths=[[1, 1]], references=[0]) == [1.0]


def test_reward_metrics():
    assert run("reward_mean", rewards=[1, 0.5, 0]) == [1.0, 0.5, 0.0]
    assert run("reward_pass_rate", rewards=[1.0, 0.9999999999, 0.5]) == [1.0, 1.0, 0.0]
    assert run("reward_pass_rate", rewards=[0.4, 0.6], threshold=0.5) == [0.0, 1.0]
    assert run("reward_model_score", rewards=[-1.5, 2]) == [-1.5, 2.0]


def test_judge_win_rate_counts_ties_half():
    assert run("judge_win_rate", preferences=[0.9, 0.5, 0.1, 0.51]) == [1.0, 0.5, 0.0, 1.0]


def test_preference_accuracy_ties_are_wrong():
    assert run("preference_accuracy", margins=[0.3, -0.1, 0.0]) == [1.0, 0.0, 0.0]


def test_perplexity_by_hand():
    # 2 nats over 4 tokens -> exp(0.5); 0 tokens counts as 1
    got = run("perplexity", token_nlls=[2.0, 0.0, 1.0], token_counts=[4, 3, 0])
    assert got == pytest.approx([math.exp(0.5), 1.0, math.exp(1.0)])
    assert not METRICS["perplexity"].higher_is_better


def test_needs_name_a_scoring_mode():
    from honellm.evaluation.scoring import SCORING_MODES

    assert {m.needs for m in METRICS.values()} <= set(SCORING_MODES)
