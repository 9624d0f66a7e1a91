"""Prompt programs, contextual calibration and prompt search on the tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from honellm.errors import HoneError
from honellm.program import PromptProgram
from honellm.prompting.search import PromptSearchConfig, build_prompt, make_prompt_artifact, search_prompt
from honellm.runtime.calibration import calibration_offsets, content_free_messages, contextual_calibration
from honellm.task import Task


@pytest.fixture(scope="module")
def intents():
    return Task.load("intents")


def test_calibration_offsets_by_hand():
    # two content-free inputs: p = (0.8, 0.2) and (0.6, 0.4) -> p_cf = (0.7, 0.3); offsets -log p_cf, centred
    logprobs = np.log([[0.8, 0.2], [0.6, 0.4]]) - 3.0  # a constant shift changes nothing (renormalised)
    offsets = calibration_offsets(logprobs, ["a", "b"])
    raw = np.array([-math.log(0.7), -math.log(0.3)])
    assert [offsets["a"], offsets["b"]] == pytest.approx(list(raw - raw.mean()), abs=1e-6)
    # the label the prompt favours gets the lower offset
    assert offsets["a"] < offsets["b"]


def test_content_free_input_fills_every_template_field(intents):
    messages = content_free_messages(intents, PromptProgram.from_task(intents), "N/A")
    assert messages[-1] == {"role": "user", "content": "Message: N/A"}
    assert messages[0]["role"] == "system"


def test_calibration_makes_a_single_content_free_input_uniform(tiny_model, intents):
    """With one content-free input, the calibrated distribution on it is exactly uniform (W = diag(p_cf)^-1)."""
    from honellm.data.chat import render_prompt
    from honellm.evaluation.scoring import EvalContext, choice_loglikelihoods
    from honellm.generation import Generator

    model, tok = tiny_model
    program = PromptProgram.from_task(intents)
    offsets = contextual_calibration(intents, program, model, tok, content_free=("N/A",))
    assert set(offsets) == set(intents.config.choices) and sum(offsets.values()) == pytest.approx(0, abs=1e-4)
    ctx = EvalContext(task=intents, program=program, artifact=None, model=model, tokenizer=tok,
                      generator=Generator(model, tok), records=[], demonstrations=None)
    prompt = render_prompt(tok, content_free_messages(intents, program, "N/A"))
    logprobs, _ = choice_loglikelihoods(ctx, [prompt], list(intents.config.choices))
    calibrated = logprobs[0] + np.array([offsets[c] for c in intents.config.choices])
    probs = np.exp(calibrated - calibrated.max())
    probs /= probs.sum()
    assert probs == pytest.approx(np.full(6, 1 / 6), abs=1e-4)


def test_calibration_needs_choices(tiny_model):
    model, tok = tiny_model
    task = Task.load("arithmetic")
    with pytest.raises(HoneError, match="needs label choices"):
        contextual_calibration(task, PromptProgram.from_task(task), model, tok)


def test_build_prompt_fixed_and_per_query(tiny_model, intents):
    model, tok = tiny_model
    fixed = build_prompt(intents, model, tok, shots=4, selector="balanced")
    assert len(fixed.demonstrations) == 4 and fixed.selector.per_query is False
    assert len({d.answer for d in fixed.demonstrations}) == 4
    # fixed demonstrations are part of the shared prefix; per-query ones are not
    assert len(fixed.shared_prefix_messages()) == 1 + 2 * 4
    per_query = build_prompt(intents, model, tok, shots=3, selector="bm25", calibration="content_free")
    assert per_query.demonstrations == [] and per_query.selector.per_query and per_query.selector.k == 3
    assert set(per_query.calibration) == set(intents.config.choices)
    assert per_query.shared_prefix_messages() == [{"role": "system", "content": intents.config.prompt.system}]


def test_per_query_program_without_a_pool_is_a_user_error(tiny_model, tiny_model_dir, intents):
    from honellm.artifact import Artifact
    from honellm.evaluation.evaluate import evaluate

    model, tok = tiny_model
    program = build_prompt(intents, model, tok, shots=2, selector="bm25")
    art = Artifact.create(name="x", method="prompt", base_model=str(tiny_model_dir), program=program, task=intents)
    with pytest.raises(HoneError, match="no demonstration pool"):
        evaluate(art, intents, "validation", limit=2, model=model, tokenizer=tok, progress=False)


def test_search_never_reads_the_test_split(tiny_model, intents, monkeypatch):
    model, tok = tiny_model
    real = Task._load_split

    def guarded(self, name):
        if name == "test":
            raise AssertionError("the prompt search read the test split")
        return real(self, name)

    monkeypatch.setattr(Task, "_load_split", guarded)
    task = Task.load("intents")
    config = PromptSearchConfig(candidates=4, shots=[2], per_query_selectors=["bm25"], max_examples=3, propose=1,
                                pool_size=60, calibration_inputs=6)
    found = search_prompt(task, model, tok, config, progress=False)
    assert found.candidates and found.best in found.candidates
    assert all(c.n == 3 for c in found.candidates)
    # uncalibrated and calibrated rows come together from one forward pass
    assert [c.calibration for c in found.candidates[:3]] == [None, "content_free", "batch"]
    assert {c.instruction_id for c in found.candidates} >= {"task", "task.1", "task.2"}


def test_search_refuses_a_task_without_validation(tiny_model):
    model, tok = tiny_model
    task = Task.load("intents", ["data.validation=null"])
    with pytest.raises(HoneError, match="never scores on test"):
        search_prompt(task, model, tok, PromptSearchConfig(candidates=1), progress=False)


def test_search_respects_the_candidate_budget(tiny_model, intents):
    model, tok = tiny_model
    config = PromptSearchConfig(candidates=5, shots=[1, 2], fixed_selectors=["balanced"], per_query_selectors=["bm25"],
                                max_examples=2, propose=0, pool_size=60, calibration_inputs=6)
    found = search_prompt(intents, model, tok, config, progress=False)
    assert len(found.candidates) == 3 * 5  # each candidate: uncalibrated, content-free and batch calibrated
    assert sum(c.shots > 0 for c in found.candidates) == 3 * 2  # 3 instructions zero-shot, then 2 with shots


def test_proposed_instructions_name_the_labels(tiny_model, intents):
    from honellm.prompting.search import propose_instructions

    model, tok = tiny_model
    proposals = propose_instructions(intents, model, tok, 2, seed=0)
    assert all(isinstance(p, str) and p.endswith("feedback.") for p in proposals)


def test_saved_search_artifact_reproduces_its_validation_score(tiny_model_dir, tmp_path, monkeypatch):
    from honellm.artifact import Artifact
    from honellm.evaluation.evaluate import evaluate

    monkeypatch.setenv("HONE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HONE_CPU_BF16", "0")  # fp32: bf16 buys nothing at the tiny model's sizes
    config = PromptSearchConfig(candidates=3, shots=[2], fixed_selectors=["random"], per_query_selectors=["bm25"],
                                max_examples=5, propose=0, pool_size=60, calibration_inputs=6)
    made = make_prompt_artifact("intents", ["prompt.instructions=[]"], search=3, model_name=str(tiny_model_dir),
                                out=tmp_path / "art", search_config=config, progress=False)
    assert (made.run_dir / "candidates.csv").exists() and (made.run_dir / "metrics.jsonl").exists()
    manifest = json.loads((tmp_path / "art" / "hone.json").read_text())
    validation = manifest["metrics"]["validation"]
    assert validation["limit"] == 5 and validation["n"] == 5
    art = Artifact.load(tmp_path / "art")
    if art.program.selector is not None and art.program.selector.per_query:
        assert art.pool()
    again = evaluate(tmp_path / "art", Task.load("intents"), "validation", limit=5, progress=False)
    assert again.score == validation["score"]
    assert list(again.ci95) == validation["ci95"]


def test_prompt_artifact_without_search(tiny_model_dir, tmp_path, monkeypatch):
    from honellm.artifact import Artifact

    monkeypatch.setenv("HONE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HONE_CPU_BF16", "0")
    made = make_prompt_artifact("intents", shots=2, selector="bm25", calibration="content_free",
                                model_name=str(tiny_model_dir),
                                out=tmp_path / "art", max_examples=3, progress=False)
    art = Artifact.load(made.path)
    assert art.program.selector.name == "bm25" and art.program.calibration
    assert art.program.calibration_method == "content_free" and art.manifest.config["calibration"] == "content_free"
    assert len(art.pool()) == len(Task.load("intents").split("train"))  # 480 < the default pool size
    assert art.manifest.metrics["validation"]["n"] == 3
    with pytest.raises(HoneError, match="already exists"):
        make_prompt_artifact("intents", model_name=str(tiny_model_dir), out=tmp_path / "art", progress=False)


def test_batch_calibration_uses_training_inputs_only(tiny_model, intents, monkeypatch):
    from honellm.runtime.calibration import batch_calibration, calibrate

    model, tok = tiny_model
    real = Task._load_split
    seen = []
    monkeypatch.setattr(Task, "_load_split", lambda self, name: seen.append(name) or real(self, name))
    task = Task.load("intents")
    offsets = batch_calibration(task, PromptProgram.from_task(task), model, tok, size=8)
    assert set(offsets) == set(task.config.choices) and sum(offsets.values()) == pytest.approx(0, abs=1e-4)
    assert set(seen) == {"train"}
    assert calibrate("batch", task, PromptProgram.from_task(task), model, tok, size=8) == offsets  # seeded
    with pytest.raises(HoneError, match="unknown calibration"):
        calibrate("platt", task, PromptProgram.from_task(task), model, tok)


def test_search_derives_calibrated_scores_exactly_as_the_evaluator(tiny_model, tiny_model_dir, intents):
    """The search scores calibrated variants from one uncalibrated pass; evaluating the calibrated program itself
    must give the very same predictions (else `hone eval` would not reproduce the search's number)."""
    from honellm.artifact import Artifact
    from honellm.evaluation.evaluate import evaluate
    from honellm.prompting.search import scores_with_offsets
    from honellm.runtime.calibration import contextual_calibration

    model, tok = tiny_model
    program = PromptProgram.from_task(intents)
    art = Artifact.create(name="x", method="prompt", base_model=str(tiny_model_dir), program=program, task=intents)
    plain = evaluate(art, intents, "validation", limit=8, model=model, tokenizer=tok, progress=False)
    offsets = contextual_calibration(intents, program, model, tok)
    derived = scores_with_offsets(intents, plain, offsets)
    art.program = program.model_copy(update={"calibration": offsets})
    direct = evaluate(art, intents, "validation", limit=8, model=model, tokenizer=tok, progress=False)
    assert derived == direct.scores
