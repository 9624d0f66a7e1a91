"""The artifact's runtime: a served artifact answers exactly as it was scored.

The same records go through `evaluate` (what `hone eval` runs) and through the OpenAI app (what `hone serve` runs,
FastAPI's TestClient) for three artifacts on the tiny model: a prompt program that selects its demonstrations per
query (BM25 over its pool, stacked on a random LoRA adapter so that the tiny model writes more than newlines), a
LoRA adapter, and a best-of-n artifact (4 samples, a reference-free reward). Each answer must be the same text
from the same number of prompt tokens, and the answers must not all be empty (empty equals empty).
"""

from __future__ import annotations

import pytest
import yaml
from fastapi.testclient import TestClient

from honellm.artifact import Artifact
from honellm.evaluation.evaluate import evaluate
from honellm.program import BestOfNSettings, InferenceSettings, PromptProgram, SelectorSpec
from honellm.runtime.apply import ArtifactRuntime
from honellm.runtime.best_of_n import BestOfNGenerator
from honellm.runtime.tasks import load_task
from honellm.serve.app import create_app
from honellm.serve.config import ServeConfig
from honellm.serve.registry import load_models
from honellm.serve.testing import make_lora_artifact
from honellm.testing import make_tiny_task

MAX_TOKENS = 6
N_RECORDS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def task_path(tiny_model_dir, tmp_path_factory):
    """The tiny sentiment data as a generation task (no label choices: the model writes its answer), with a reward
    that reads only the answer, so a server (which has no reference) can apply it too."""
    folder = tmp_path_factory.mktemp("runtime-task")
    path = make_tiny_task(folder, tiny_model_dir)
    config = yaml.safe_load(path.read_text())
    del config["choices"]
    config |= {"metric": "exact_match", "generation": {"max_new_tokens": MAX_TOKENS},
               "rewards": [{"name": "length_penalty", "target": 12}]}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def artifacts(task_path, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-artifacts")
    task = load_task(task_path)
    base = str(tiny_model_dir)
    lora = make_lora_artifact(tiny_model_dir, root / "lora", seed=3, name="lora", system="Classify the review.")
    selecting = Artifact.create(
        name="per-query", method="few-shot", base_model=base, task=task, kind="adapter",
        program=PromptProgram(system="Classify the review.", selector=SelectorSpec(name="bm25", k=2, per_query=True)))
    selecting.save(root / "per-query", pool=[dict(r) for r in task.split("train")],
                   extra_files={"adapter": Artifact.load(lora).adapter_dir})
    best = Artifact.create(name="best-of-4", method="best_of_n", base_model=base, task=task,
                           program=PromptProgram.from_task(task))
    best.manifest.inference = InferenceSettings(best_of_n=BestOfNSettings(n=4, temperature=1.0), policy="zero-shot")
    best.save(root / "best-of-4")
    return {"per-query": root / "per-query", "lora": lora, "best-of-4": root / "best-of-4"}


def test_the_manifest_inference_block_is_typed_and_round_trips(artifacts):
    loaded = Artifact.load(artifacts["best-of-4"])
    assert isinstance(loaded.manifest.inference, InferenceSettings)
    assert loaded.manifest.inference.best_of_n == BestOfNSettings(n=4, temperature=1.0)
    assert Artifact.load(artifacts["lora"]).manifest.inference is None


def test_the_runtime_wraps_the_generator_only_for_best_of_n(artifacts, task_path, tiny_model):
    model, tokenizer = tiny_model
    task = load_task(task_path)
    best = ArtifactRuntime.load(Artifact.load(artifacts["best-of-4"]), task, model=model, tokenizer=tokenizer)
    plain = ArtifactRuntime.load(Artifact.load(artifacts["per-query"]), task, model=model, tokenizer=tokenizer)
    assert isinstance(best.generator, BestOfNGenerator) and best.generator.n == 4
    assert not isinstance(plain.generator, BestOfNGenerator)
    record = task.split("validation")[0]
    chosen = plain.demonstrations([record])[0]
    assert len(chosen) == 2
    # the chat path picks the same demonstrations for the same user turn
    turns = [{"role": "user", "content": plain.query(record)}]
    assert plain.chat_messages(turns) == plain.artifact.program.chat_messages(turns, chosen)


@pytest.mark.parametrize("name", ["per-query", "lora", "best-of-4"])
def test_serve_answers_as_evaluate_scored(name, artifacts, task_path, tiny_model_dir, one_thread):
    task = load_task(task_path)
    artifact = Artifact.load(artifacts[name])
    # batch_size 4: best-of-n draws its 4 samples as one batch, as the server does (its batches hold up to 16)
    result = evaluate(artifact, task, "validation", N_RECORDS, batch_size=4, seed=0, progress=False)
    records = task.split("validation")[:N_RECORDS]

    models = load_models([str(artifacts[name])], dtype="fp32", device="cpu")
    config = ServeConfig(max_tokens_limit=64)
    served, prompt_tokens = [], []
    with TestClient(create_app(models, config)) as client:
        for record in records:
            turns = artifact.program.turns(task, record)
            response = client.post("/v1/chat/completions", json={
                "model": models[0].name, "messages": turns, "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 0})
            assert response.status_code == 200, response.text
            served.append(response.json()["choices"][0]["message"]["content"])
            prompt_tokens.append(response.json()["usage"]["prompt_tokens"])

    scored = [r.prediction for r in result.records]
    assert served == scored
    assert any(scored), "nothing was generated: equal answers would prove nothing"
    tokenizer = models[0].engine.tokenizer
    assert prompt_tokens == [len(tokenizer(r.prompt, add_special_tokens=False)["input_ids"]) for r in result.records]
    if name == "per-query":  # the evaluator's prompts carry the selected demonstrations
        assert all(r.prompt.count("Review:") == 3 for r in result.records)
