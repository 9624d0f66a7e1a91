"""evaluate() on the embedded model and real SST-2 data: its exact zero-shot score, and a saved artifact that
evaluates to the same number after reload. Small subsets keep each test well under a minute."""

from __future__ import annotations

import pytest

from honellm.evaluation.evaluate import evaluate
from honellm.task import Task

N = 24


@pytest.fixture(scope="module")
def sst2(shared_data):
    return Task.load("examples/sst2.yaml", [f"data.train={shared_data}/sst2/train.jsonl",
                                            f"data.validation={shared_data}/sst2/validation.jsonl"])


@pytest.fixture(scope="module")
def embedded(embedded_model_dir):
    from honellm.models import load

    return load("smollm2-135m-instruct")


# The zero-shot predictions on the first N validation rows, measured on this model in bf16 and in fp32 (the same
# list: the smallest gap between the two labels' log-probs is 0.06 nats in bf16, 0.08 in fp32, far above either
# precision's rounding). The model leans "negative": 21 of 24, so 13 of 24 right.
ZERO_SHOT_POSITIVE_ROWS = {5, 19, 23}
ZERO_SHOT_CORRECT = 13


def test_zero_shot_sst2_scores_its_exact_greedy_choice_accuracy(sst2, embedded):
    """Greedy choice scoring is deterministic on a fixed model and split, so the score is an exact number, not a
    bound. What is true of it: 13/24, an interval around it that still contains chance (0.5; on all 100 rows the
    zero-shot score is 0.60, interval 0.51-0.69), each prediction the label with the higher log-prob, and the
    score the share of predictions equal to their reference. A scorer picking the first label (14/24), the last
    (10/24) or the less likely one (11/24) fails here."""
    model, tok = embedded
    result = evaluate("smollm2-135m-instruct", sst2, "validation", N, model=model, tokenizer=tok, progress=False)
    assert result.mode == "choices" and result.n == N and len(result.records) == N
    for record in result.records:
        logprobs = record.details["choice_logprobs"]
        assert set(logprobs) == {"positive", "negative"} and all(v < 0 for v in logprobs.values())
        assert record.prediction == max(logprobs, key=logprobs.get)
    predictions = [r.prediction for r in result.records]
    assert predictions == ["positive" if i in ZERO_SHOT_POSITIVE_ROWS else "negative" for i in range(N)]
    correct = sum(r.prediction == r.reference for r in result.records)
    assert correct == ZERO_SHOT_CORRECT and result.score == pytest.approx(correct / N, abs=1e-12)
    assert result.extras["predicted_label_share"] == pytest.approx({"positive": 3 / N, "negative": 21 / N},
                                                                   abs=1e-4)
    assert result.ci95[0] < 0.5 < result.ci95[1]  # 24 rows cannot tell this zero-shot score from chance
    assert result.ci95[0] <= result.score <= result.ci95[1] and result.ci95[1] - result.ci95[0] < 0.5
    assert result.cost.shared_prefix_tokens > 0  # the system turn is shared by every prompt
    assert result.records[0].details["choice_tokens"]["positive"] == 2  # "positive" + "<|im_end|>"


def test_saved_prompt_artifact_evaluates_to_the_same_score(sst2, embedded, tmp_path):
    from honellm.artifact import Artifact
    from honellm.prompting.search import build_prompt, demonstration_pool

    model, tok = embedded
    pool = demonstration_pool(sst2)
    program = build_prompt(sst2, model, tok, shots=4, selector="bm25", calibration="content_free", pool=pool)
    art = Artifact.create(name="sst2-bm25", method="prompt", base_model="smollm2-135m-instruct", program=program,
                          task=sst2)
    before = evaluate(art, sst2, "validation", N, model=model, tokenizer=tok, progress=False, pool=pool)
    art.save(tmp_path / "art", pool=[dict(r) for r in pool])
    after = evaluate(tmp_path / "art", sst2, "validation", N, progress=False)  # loads the model itself
    assert after.score == before.score
    assert [r.prediction for r in after.records] == [r.prediction for r in before.records]
