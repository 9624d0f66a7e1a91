"""The one registry of methods: every method's contract, the worked example of docs/adding-a-method.md run through
the registry, the data checks, and the docs' method tables kept in step with the registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import Field

from honellm.artifact import Artifact
from honellm.config import Config
from honellm.errors import HoneError
from honellm.evaluation.evaluate import evaluate
from honellm.methods import catalog
from honellm.methods.registry import FAMILIES, METHODS, NEEDS, Method, register_method
from honellm.program import PromptProgram
from honellm.runtime.tasks import load_task
from honellm.testing import make_tiny_preference_task, make_tiny_task

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_method_declares_the_contract():
    methods = catalog.all_methods()
    assert {"zero-shot", "few-shot", "prompt-search", "lora", "full", "dpo", "kto", "grpo", "ppo",
            "best_of_n"} <= set(methods)
    assert {m.family for m in methods.values()} == set(FAMILIES)
    for method in methods.values():
        assert method.summary, method.name
        assert set(method.needs) <= set(NEEDS), method.name
        assert callable(method.run), method.name
        for name, field in method.config.model_fields.items():
            assert field.description, f"{method.name}.{name} has no description"
            assert not field.is_required(), f"{method.name}.{name} has no default"
        assert method.config.model_config.get("extra") == "forbid", f"{method.name} accepts unknown keys"


def test_a_name_is_registered_once_and_unknown_names_suggest_the_closest():
    with pytest.raises(ValueError, match="registered twice"):
        register_method(METHODS["dpo"])
    with pytest.raises(HoneError, match="did you mean 'lora'"):
        catalog.get_method("lorra", "tuning")
    with pytest.raises(HoneError) as info:  # a method of another family says which verb runs it
        catalog.get_method("dpo", "tuning")
    assert "hone align" in info.value.fix
    with pytest.raises(HoneError, match="did you mean 'shots'"):
        catalog.method_config("few-shot", None, ["shot=2"])
    with pytest.raises(ValueError, match="unknown needs"):
        Method("x", "prompting", Config, lambda *a, **k: None, "x", needs=("pears",))


def test_overrides_split_into_task_fields_and_method_settings():
    assert catalog.split_overrides(["data.train=a.jsonl", "lr=1e-4", "model=m", "--r=8"]) == (
        ["data.train=a.jsonl", "model=m"], ["lr=1e-4", "--r=8"])


def test_the_data_a_method_needs_is_checked_before_it_runs(tiny_model_dir, tmp_path):
    sft = load_task(make_tiny_task(tmp_path / "sft", tiny_model_dir))
    prefs = load_task(make_tiny_preference_task(tmp_path / "prefs", tiny_model_dir))
    assert catalog.get_method("dpo").missing(sft)[0].startswith("dpo trains on preference data")
    assert catalog.get_method("dpo").missing(prefs) is None
    assert catalog.get_method("kto").missing(prefs) is None
    assert catalog.get_method("grpo").missing(sft) is None  # its metric (the label said) is a verifiable reward
    assert catalog.get_method("grpo").missing(prefs)[0].startswith("grpo trains on prompts with a checkable answer")
    sft.config.metric = "perplexity"  # a metric that reads no answer is no reward
    assert catalog.get_method("grpo").missing(sft)[0] == "grpo needs a reward, and task 'tiny-sentiment' has none"
    assert catalog.get_method("grpo").missing(sft, catalog.get_method("grpo").config(reward_model="rm")) is None
    sft.config.metric = "accuracy"
    assert catalog.get_method("lora").missing(sft) is None
    with pytest.raises(HoneError, match="trains on preference data"):
        catalog.run_method(sft, "dpo", out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------- docs/adding-a-method.md, run


class InstructionConfig(Config):
    system: str = Field("Answer with one word.", description="the system instruction the artifact uses")


def run_instruction(task, config: InstructionConfig, *, out=None, resume=False, force=False) -> Artifact:
    program = PromptProgram.from_task(task).model_copy(update={"system": config.system})
    artifact = Artifact.create(name=f"{task.name}-instruction", method="instruction", base_model=task.config.model,
                               program=program, task=task, config=config.model_dump())
    if out is not None:
        artifact.save(Path(out) / "artifact", force=force)
    return artifact


@pytest.fixture
def instruction_method():
    method = register_method(Method("instruction", "prompting", InstructionConfig, run_instruction,
                                    "the task's program with the system instruction given in the config"))
    yield method
    del METHODS["instruction"]


def test_the_worked_example_registers_configures_and_runs(instruction_method, tiny_model_dir, tmp_path):
    assert catalog.get_method("instruction", "prompting") is instruction_method
    with pytest.raises(HoneError, match="did you mean 'system'"):
        catalog.method_config("instruction", None, ["sytem=Reply in French."])
    spec, config = catalog.method_config("instruction", None, ["system=Reply in French."])
    task = load_task(make_tiny_task(tmp_path / "task", tiny_model_dir))
    artifact = catalog.run_method(task, spec, config, out=tmp_path / "run")
    saved = Artifact.load(tmp_path / "run" / "artifact")
    assert saved.program.system == "Reply in French." and saved.manifest.method == "instruction"
    result = evaluate(saved, task, "validation", 4, progress=False)
    assert result.n == 4 and "Reply in French." in result.records[0].prompt
    assert artifact.program == saved.program


# ------------------------------------------------------------------------------- the docs read the registry


@pytest.mark.parametrize("family, page", [("prompting", "prompting.md"), ("tuning", "tuning.md"),
                                          ("reward", "reward.md")])
def test_the_docs_method_tables_list_every_registered_method(family, page):
    text = (DOCS / page).read_text()
    listed = set(re.findall(r"^\| `([\w-]+)` \|", text, flags=re.MULTILINE))
    missing = set(catalog.all_methods(family)) - listed
    assert not missing, f"docs/{page} has no table row for: {', '.join(sorted(missing))}"
