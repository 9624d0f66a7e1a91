"""Naming served models, refusing what cannot be served, grouping adapters onto one base, the prompt program,
and the hook for per-query demonstration selection."""

from __future__ import annotations

import json

import pytest

from honellm.artifact import Artifact
from honellm.errors import HoneError
from honellm.program import Demonstration, PromptProgram
from honellm.serve.registry import (
    load_models,
    parse_spec,
    plan_engines,
    resolve_models,
)
from honellm.serve.testing import ScriptedGenerator, make_lora_artifact


@pytest.fixture(scope="module")
def lora(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return (make_lora_artifact(tiny_model_dir, root / "one" / "artifact", seed=1, name="sst2-lora"),
            make_lora_artifact(tiny_model_dir, root / "two" / "artifact", seed=2, name="sst2-lora"))


def scripted(model, tokenizer, batch_size):
    return ScriptedGenerator()


def test_parse_spec():
    assert parse_spec("runs/x/artifact") == (None, "runs/x/artifact")
    assert parse_spec("fast=runs/x/artifact") == ("fast", "runs/x/artifact")
    with pytest.raises(HoneError):
        parse_spec("a/b=c")
    with pytest.raises(HoneError):
        parse_spec("=c")


def test_names_come_from_the_manifest_the_folder_or_the_user(lora, tiny_model_dir):
    entries = resolve_models([str(lora[0]), str(tiny_model_dir), f"other={lora[1]}"])
    assert [e.name for e in entries] == ["sst2-lora", tiny_model_dir.name, "other"]
    assert [e.peft_type for e in entries] == ["LORA", None, "LORA"]


def test_two_models_with_one_name_are_refused_with_the_fix(lora):
    with pytest.raises(HoneError) as err:
        resolve_models([str(lora[0]), str(lora[1])])
    assert "sst2-lora" in err.value.what and "=" in err.value.fix


def test_nothing_to_serve_and_unknown_model(tmp_path):
    with pytest.raises(HoneError):
        resolve_models([])
    with pytest.raises(HoneError):
        resolve_models([str(tmp_path)])  # neither an artifact nor a model folder


def test_reward_models_and_prompt_learning_adapters_are_refused(lora, tiny_model_dir, tmp_path):
    reward = Artifact.create(name="rm", method="reward_model", base_model=str(tiny_model_dir), kind="reward_model",
                             program=PromptProgram())
    reward.save(tmp_path / "rm")
    with pytest.raises(HoneError, match="reward model"):
        resolve_models([str(tmp_path / "rm")])
    import shutil

    shutil.copytree(lora[0], tmp_path / "prefix")
    config_path = tmp_path / "prefix" / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(HoneError, match="PREFIX_TUNING"):
        resolve_models([str(tmp_path / "prefix")])


def test_base_joins_its_adapters_engine(lora, tiny_model_dir):
    entries = resolve_models([f"x={lora[0]}", str(tiny_model_dir), f"y={lora[1]}"])
    plan = plan_engines(entries)
    assert len(plan) == 1
    assert [e.name for e in next(iter(plan.values()))] == ["x", "y", tiny_model_dir.name]


def test_load_models_keeps_the_order_given_and_one_engine(lora, tiny_model_dir):
    models = load_models([f"x={lora[0]}", str(tiny_model_dir), f"y={lora[1]}"], generator_factory=scripted)
    assert [m.name for m in models] == ["x", tiny_model_dir.name, "y"]
    assert [m.adapter for m in models] == ["a0", None, "a1"]
    assert len({id(m.engine) for m in models}) == 1 and models[0].engine.has_adapters
    assert set(models[0].engine.model.peft_config) == {"a0", "a1"}


def test_plain_model_alone_has_no_adapters(tiny_model_dir):
    (served,) = load_models([str(tiny_model_dir)], generator_factory=scripted)
    assert served.adapter is None and not served.engine.has_adapters
    assert served.chat_messages([{"role": "user", "content": "hi"}]) == [{"role": "user", "content": "hi"}]
    assert served.describe()["hone"]["kind"] == "base"


def test_program_system_and_demonstrations_go_first(tiny_model_dir, tmp_path):
    program = PromptProgram(system="Be terse.", demonstrations=[Demonstration(query="q1", answer="a1")])
    Artifact.create(name="fewshot", method="few-shot", base_model=str(tiny_model_dir), program=program).save(
        tmp_path / "fewshot")
    (served,) = load_models([str(tmp_path / "fewshot")], generator_factory=scripted)
    messages = served.chat_messages([{"role": "system", "content": "ignored"}, {"role": "user", "content": "hi"}])
    assert messages == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "q1"},
                        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "hi"}]


def test_per_query_selector_picks_the_demonstrations_the_evaluator_would(tiny_model_dir, tmp_path):
    from honellm.prompting.search import make_prompt_artifact
    from honellm.runtime.selectors import select_demonstrations
    from honellm.task import Task
    from honellm.testing import make_tiny_task

    task_path = make_tiny_task(tmp_path / "task", tiny_model_dir, n_train=24, n_validation=4)
    made = make_prompt_artifact(str(task_path), shots=2, selector="bm25", per_query=True, out=tmp_path / "sel",
                                run_dir=tmp_path / "run", progress=False)
    art = Artifact.load(made.path)
    assert art.program.selector.per_query and len(art.pool()) == 24
    (served,) = load_models([str(made.path)], generator_factory=scripted)
    messages = served.chat_messages([{"role": "user", "content": "Review: a dull, lazy film"}])

    task = Task.load(task_path)
    expected = select_demonstrations(art.program.selector, task, art.program, [{"text": "a dull, lazy film"}], art.pool())[0]
    shown = [(m["content"]) for m in messages[1:-1]]
    assert shown == [x for d in expected for x in (d.query, d.answer)] and len(expected) == 2
    assert messages[-1] == {"role": "user", "content": "Review: a dull, lazy film"}
    assert all("dull" in d.query or "lazy" in d.query for d in expected)  # BM25 found lexical neighbours


def test_a_per_query_artifact_without_its_pool_is_refused(tiny_model_dir, tmp_path):
    from honellm.program import SelectorSpec
    from honellm.serve.registry import demonstration_picker

    program = PromptProgram(system="S", selector=SelectorSpec(name="bm25", k=1))
    Artifact.create(name="sel", method="prompt", base_model=str(tiny_model_dir), program=program).save(tmp_path / "sel")
    with pytest.raises(HoneError, match="no demonstration pool"):
        demonstration_picker(Artifact.load(tmp_path / "sel"))


def test_adapters_are_merged_only_on_an_engine_that_never_switches(lora, tiny_model_dir):
    """An engine serving several entries switches adapters between batches: it runs them unmerged (a switch would
    rebuild the merged weights); a lone adapter is merged into the engine's weights."""
    shared = load_models([f"x={lora[0]}", str(tiny_model_dir), f"y={lora[1]}"])
    alone = load_models([f"x={lora[0]}"])
    assert shared[0].engine.generator._runner.derived.merge_adapters is False
    assert alone[0].engine.generator._runner.derived.merge_adapters is True
