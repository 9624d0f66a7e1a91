"""The cold start for tool use: demonstrations of calculator episodes as SFT data (`builtin:arithmetic_tools/*`),
chat records training every assistant turn, prompts rendered with the tools exactly as an episode renders them,
and `tune` on the built-in `arithmetic_tools_sft` task on the tiny model."""

from __future__ import annotations

import pytest

from honellm.artifact import Artifact
from honellm.builtin import builtin_records
from honellm.builtin.generators import SIZES, arithmetic
from honellm.evaluation.evaluate import evaluate
from honellm.export import export_artifact
from honellm.generation.tools import ToolEnvironment, calculator, load_tools, parse_tool_calls
from honellm.models import load_tokenizer
from honellm.program import PromptProgram
from honellm.reward.recipes import align_task
from honellm.runs import read_metrics
from honellm.task import Task
from honellm.training.batching import IGNORE, encode_conversation, encode_turns
from honellm.tuning import tune_task
from honellm.tuning.config import SFTConfig
from honellm.tuning.sft import _encoder


def test_every_arithmetic_record_has_an_expression_the_calculator_answers():
    records = arithmetic()
    assert len(records) == sum(SIZES["arithmetic"].values())
    for record in records:
        assert set(record) == {"question", "answer", "expression"}
        assert calculator(record["expression"]) == record["answer"], record
    ops = {r["expression"].count(" ") for r in records}
    assert ops == {2, 4}  # "a op b" and "a + b - c"
    assert any(" / " in r["expression"] for r in records) and any(" * " in r["expression"] for r in records)


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_tool_demonstrations_are_the_arithmetic_problems_as_calculator_episodes(split):
    problems = builtin_records(f"arithmetic/{split}")
    demos = builtin_records(f"arithmetic_tools/{split}")
    assert len(demos) == len(problems) == SIZES["arithmetic"][split]
    for problem, demo in zip(problems, demos, strict=True):
        user, call, tool, final = demo["messages"]
        assert user == {"role": "user", "content": problem["question"]}
        (parsed,) = parse_tool_calls(call["content"], ["calculator"])
        assert call["role"] == "assistant" and parsed.arguments == {"expression": problem["expression"]}
        assert tool == {"role": "tool", "name": "calculator", "content": calculator(problem["expression"])}
        assert final == {"role": "assistant", "content": problem["answer"]}


def test_the_tool_task_asks_the_question_and_scores_the_final_answer():
    task = Task.load("arithmetic_tools_sft")
    record = task.split("validation")[0]
    assert task.format == "chat" and task.metric == "numeric_match"
    assert task.messages(record) == record["messages"][:1]  # the episode starts at the question
    assert task.target(record) == record["answer"]
    # without tools, a chat record is still its turns up to the last answer
    plain = Task.load("arithmetic_tools_sft", ["tools=[]"])
    assert plain.messages(record) == record["messages"][:-1]


def test_encode_turns_trains_every_assistant_turn_and_masks_the_rest(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    seq = encode_turns(tokenizer, messages, max_length=512)
    trained = tokenizer.decode([i for i, label in zip(seq.input_ids, seq.labels, strict=True) if label != IGNORE])
    assert trained == "Hello<|im_end|>4<|im_end|>"
    # the ids are the whole conversation as the template writes it
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(seq.input_ids) == whole.rstrip("\n")
    # one assistant turn at the end: exactly what encode_conversation gives
    single = encode_turns(tokenizer, messages[:3], max_length=512)
    reference = encode_conversation(tokenizer, messages[:2], "Hello", max_length=512)
    assert (single.input_ids, single.labels) == (reference.input_ids, reference.labels)
    cut, cut_reference = (encode_turns(tokenizer, messages[:3], max_length=12),
                          encode_conversation(tokenizer, messages[:2], "Hello", max_length=12))
    assert (cut.input_ids, cut.labels, cut.truncated) == (cut_reference.input_ids, cut_reference.labels, True)
    every = encode_turns(tokenizer, messages, max_length=512, completion_only=False)
    assert every.labels == every.input_ids


def _first_example(task_name: str, model_dir):
    """The first training record of a built-in tool task, its SFT sequence, and the prompt ids an episode of it
    starts from: (task, tokenizer, program, record, sequence, environment, prompt ids)."""
    task = Task.load(task_name, [f"model={model_dir}"])
    tokenizer = load_tokenizer(model_dir)
    program = PromptProgram.from_task(task)
    record = task.split("train")[0]
    seq = _encoder(task, program, tokenizer, SFTConfig(max_length=1024))(record, task.target(record))
    environment = ToolEnvironment(load_tools(task.config.tools), tokenizer)
    return task, tokenizer, program, record, seq, environment, environment.prompt_ids(program.messages(task, record))


def test_sft_examples_of_a_tool_task_are_the_episode_s_tokens(tiny_model_dir):
    task, tokenizer, program, record, seq, environment, prompt_ids = _first_example("arithmetic_tools_sft",
                                                                                    tiny_model_dir)
    assert "calculator" in environment.render(program.messages(task, record))  # described in the system turn
    first = next(i for i, label in enumerate(seq.labels) if label != IGNORE)
    assert seq.input_ids[:first] == prompt_ids  # the prompt SFT trains on is the prompt an episode shows
    call = record["messages"][1]["content"]
    call_ids = tokenizer(call + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert seq.input_ids[first:first + len(call_ids)] == call_ids == seq.labels[first:first + len(call_ids)]
    # then the tool turn (masked) and the final answer (trained); the whole is the episode as the template renders it
    full = environment.render(program.messages(task, record) + record["messages"][1:], generation_prompt=False)
    assert tokenizer.decode(seq.input_ids) == full.rstrip("\n")
    trained = tokenizer.decode([i for i, label in zip(seq.input_ids, seq.labels, strict=True) if label != IGNORE])
    assert trained == f"{call}<|im_end|>{record['answer']}<|im_end|>"
    masked = tokenizer.decode([i for i, label in zip(seq.input_ids, seq.labels, strict=True) if label == IGNORE])
    assert "<|im_start|>tool" in masked


def test_sft_of_a_fields_task_with_tools_renders_the_tools_too(tiny_model_dir):
    _, tokenizer, _, record, seq, _, prompt_ids = _first_example("arithmetic_tools", tiny_model_dir)
    assert seq.input_ids[:len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(seq.input_ids[len(prompt_ids):]) == f"{record['answer']}<|im_end|>"


def test_tune_on_the_tool_demonstrations_writes_an_artifact_and_validates_by_episodes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    art = tune_task("arithmetic_tools_sft", "lora",
                    [f"model={tiny_model_dir}", "generation.max_new_tokens=4", "tool_turns=2", "max_steps=2",
                     "eval_every=2", "eval_limit=2", "batch_size=2", "r=4", "precision=fp32"], out=str(out))
    loaded = Artifact.load(out / "artifact")
    assert art.path == out / "artifact" and loaded.kind == "adapter"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    (evaluation,) = [r for r in rows if r.get("event") == "eval"]
    assert evaluation["val_loss"] > 0 and 0 <= evaluation["val_numeric_match"] <= 1


def test_the_documented_cold_start_path_runs_on_the_tiny_model(tiny_model_dir, tmp_path):
    """tune arithmetic_tools_sft -> eval on arithmetic_tools (episodes) -> export merged -> GRPO from it -> eval."""
    small = [f"model={tiny_model_dir}", "generation.max_new_tokens=4", "tool_turns=2"]
    tune_task("arithmetic_tools_sft", "lora", [*small, "max_steps=1", "eval_every=0", "batch_size=2", "r=4",
                                               "precision=fp32"], out=str(tmp_path / "sft"))
    tools_task = Task.load("arithmetic_tools", small)
    result = evaluate(str(tmp_path / "sft" / "artifact"), tools_task, "test", limit=2)
    assert result.n == 2 and all(r.details["episode"][0]["role"] == "assistant" for r in result.records)
    assert "tool_calls_per_example" in result.extras
    export_artifact(tmp_path / "sft" / "artifact", tmp_path / "merged")
    align_task("arithmetic_tools", "grpo", [*small, f"model={tmp_path / 'merged'}", "max_steps=1",
                                            "prompts_per_step=2", "group_size=2", "batch_size=4", "r=4",
                                            "precision=fp32", "eval_every=0", "max_new_tokens=4", "dynamic_sampling=false"],
               out=str(tmp_path / "grpo"))
    (train,) = [r for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if r.get("kind") == "train"]
    assert train["tool_calls"] >= 0
    after = evaluate(str(tmp_path / "grpo" / "artifact"), Task.load("arithmetic_tools", small), "test", limit=2)
    assert after.n == 2 and 0 <= after.score <= 1


def test_grpo_from_sft_on_the_demonstrations_runs_episodes_from_the_questions(tiny_model_dir, tmp_path):
    """The one-command composition: SFT on the demonstrations, then GRPO on the same task, whose chat records give
    GRPO the questions as prompts (an episode starts before the first assistant turn) and the answers as references."""
    from honellm.search.compose import grpo_from_sft

    task = Task.load("arithmetic_tools_sft", [f"model={tiny_model_dir}", "generation.max_new_tokens=4",
                                              "tool_turns=2"])
    art = grpo_from_sft(task, sft_overrides=["max_steps=1", "r=4", "eval_every=0", "batch_size=2"],
                        rl_overrides=["max_steps=1", "prompts_per_step=2", "group_size=2", "max_new_tokens=4",
                                      "eval_every=0", "save_every=0", "r=4", "dynamic_sampling=false"],
                        out=tmp_path / "c")
    assert art.manifest.method == "lora+grpo"
    (train,) = [r for r in read_metrics(tmp_path / "c" / "grpo" / "metrics.jsonl") if r.get("kind") == "train"]
    assert train["tool_calls"] >= 0 and train["updates"] == 1


def test_prompt_tuning_on_a_tool_task_validates_by_loss_only(tiny_model_dir, tmp_path):
    """Virtual-token models do not run in the generation engine, so no episodes: the validation loss decides."""
    out = tmp_path / "run"
    tune_task("arithmetic_tools_sft", "prompt_tuning",
              [f"model={tiny_model_dir}", "generation.max_new_tokens=4", "max_steps=1", "eval_every=1",
               "eval_limit=2", "batch_size=2", "precision=fp32"], out=str(out))
    (evaluation,) = [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "eval"]
    assert evaluation["val_loss"] > 0 and "val_numeric_match" not in evaluation
