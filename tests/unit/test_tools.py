"""Tool use: the calculator, tool-call parsing, loading tools, episodes whose tokens extend exactly, the loss mask
through rollout batches, and tools in evaluation and GRPO on the tiny model."""

from __future__ import annotations

import pytest
import torch

from honellm.errors import HoneError
from honellm.evaluation.evaluate import evaluate
from honellm.generation.params import FINISH_STOP, Completion
from honellm.generation.tools import (
    ToolEnvironment,
    ToolGenerator,
    calculator,
    load_tools,
    make_tool,
    parse_tool_calls,
)
from honellm.models import load_tokenizer
from honellm.reward.recipes.grpo import GRPOConfig, grpo
from honellm.reward.rollout import rollout_batches
from honellm.runs import read_metrics
from honellm.task import Task
from honellm.testing import make_tiny_reward_task

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "2 + 3 * 4"}}</tool_call>'


def test_calculator_computes_and_refuses_code():
    assert calculator("2 + 3 * 4") == "14"
    assert calculator("7 / 2") == "3.5"
    assert calculator("1,200 x 3") == "3600"
    assert calculator("(5 - 8) ** 2") == "9"
    assert calculator("1 / 0").startswith("error:")
    assert calculator("__import__('os').system('true')").startswith("error:")
    assert calculator("2 ** 1000").startswith("error:")


def test_parse_tool_calls_in_the_common_formats():
    names = ["calculator"]
    assert parse_tool_calls(CALL, names)[0].arguments == {"expression": "2 + 3 * 4"}
    bare = parse_tool_calls('I will compute. {"name": "calculator", "parameters": {"expression": "1+1"}}', names)
    assert [(c.name, c.arguments) for c in bare] == [("calculator", {"expression": "1+1"})]
    as_string = parse_tool_calls('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"4\\"}"}'
                                 '</tool_call>', names)
    assert as_string[0].arguments == {"expression": "4"}
    assert parse_tool_calls('{"name": "search", "arguments": {}}', names) == []  # not a tool we have
    assert parse_tool_calls("The answer is 14.", names) == []
    assert len(parse_tool_calls(CALL + CALL, names)) == 2
    wrapped = parse_tool_calls('{"type": "function", "function": {"name": "calculator", "arguments": {"expression": '
                               '"3"}}}', names)  # OpenAI's form, which serve.tools reads through the same call_from
    assert [(c.name, c.arguments) for c in wrapped] == [("calculator", {"expression": "3"})]
    assert parse_tool_calls('<tool_call>{"name": "calculator", "arguments": "not json"}</tool_call>', names) == []


def test_load_tools_builtin_and_python(tmp_path):
    (tmp_path / "my_tools.py").write_text(
        'def lookup(city: str) -> str:\n    """Weather of a city.\n\n    Args:\n        city: the city\n    """\n'
        '    return "sunny in " + city\n\ndef nodoc(x):\n    return x\n')
    tools = load_tools([{"name": "calculator"}, {"python": "my_tools.py:lookup"}], tmp_path)
    assert [t.name for t in tools] == ["calculator", "lookup"]
    assert tools[1]({"city": "Oslo"}) == "sunny in Oslo"
    assert tools[1]({"town": "Oslo"}).startswith("error: bad arguments")
    assert tools[0].schema["function"]["parameters"]["required"] == ["expression"]
    with pytest.raises(HoneError, match="unknown tool 'calc'"):
        load_tools([{"name": "calc"}])
    with pytest.raises(HoneError, match="cannot be described"):
        load_tools([{"python": "my_tools.py:nodoc"}], tmp_path)
    with pytest.raises(HoneError, match="has no function 'lookp'") as err:
        load_tools([{"python": "my_tools.py:lookp"}], tmp_path)
    assert "lookup" in err.value.fix


class ScriptedGenerator:
    """Answers each prompt with the next text of a script (per prompt row), as token ids ending in eos."""

    def __init__(self, tokenizer, scripts):
        self.tokenizer, self.scripts, self.turn, self.seen = tokenizer, scripts, 0, []
        self.eos_ids = [tokenizer.eos_token_id]

    def generate(self, prompts, params=None, **_):
        self.seen.append([list(p) for p in prompts])
        out = []
        for row, _ in enumerate(prompts):
            text = self.scripts[row][min(self.turn, len(self.scripts[row]) - 1)]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            out.append(Completion(text, ids, FINISH_STOP, len(prompts[row]), len(ids)))
        self.turn += 1
        return out


def test_an_episode_extends_its_tokens_exactly_and_masks_the_tool_turns(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    env = ToolEnvironment([make_tool(calculator)], tokenizer, max_turns=3)
    assert not env.native  # the tiny ChatML template ignores tools: they are described in the system turn
    messages = [{"role": "system", "content": "Solve."}, {"role": "user", "content": "What is 2 + 3 * 4?"}]
    assert "calculator" in env.render(messages) and "Solve." in env.render(messages)
    generator = ScriptedGenerator(tokenizer, [[CALL, "The answer is 14."]])
    (episode,) = env.run(generator, [messages], None)
    assert episode.final_text == "The answer is 14." and episode.tool_calls == 1 and episode.tool_errors == 0
    assert [m["role"] for m in episode.messages] == ["assistant", "tool", "assistant"]
    assert episode.messages[1]["content"] == "14"
    # the second turn was generated from exactly prompt + first turn + tool turn, and the whole trajectory is the
    # conversation as the template renders it: the ids the trainer scores are the ids the model saw
    prompt_ids = env.prompt_ids(messages)
    assert generator.seen[1][0] == prompt_ids + episode.token_ids[:len(generator.seen[1][0]) - len(prompt_ids)]
    full = env.render(messages + episode.messages, generation_prompt=False)
    assert tokenizer.decode(prompt_ids + episode.token_ids) == full.rstrip("\n")
    turn = len(tokenizer(CALL, add_special_tokens=False)["input_ids"]) + 1
    assert episode.mask[:turn] == [1] * turn and 0 in episode.mask and episode.mask[-1] == 1
    tool_part = [t for t, m in zip(episode.token_ids, episode.mask, strict=True) if m == 0]
    assert "14" in tokenizer.decode(tool_part) and "tool" in tokenizer.decode(tool_part)


def test_episodes_stop_at_max_turns_and_report_tool_errors(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    env = ToolEnvironment([make_tool(calculator)], tokenizer, max_turns=2)
    bad = '<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>'
    generator = ScriptedGenerator(tokenizer, [[bad, bad, bad], ["No tools needed: 3"]])
    first, second = env.run(generator, [[{"role": "user", "content": "q"}]] * 2, None)
    assert first.tool_calls == 1 and first.tool_errors == 1 and first.final_text == bad  # the last turn allowed
    assert second.tool_calls == 0 and second.final_text == "No tools needed: 3" and set(second.mask) == {1}


def test_rollout_batches_take_the_loss_only_on_masked_tokens():
    batches = rollout_batches([[1, 2]], [[5, 6, 7, 8]], batch_size=2, pad_id=0, token_masks=[[1, 0, 0, 1]])
    (b,) = batches
    assert b.mask.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    assert b.batch.labels.tolist() == [[-100, -100, 5, -100, -100, 8]]


def test_tool_generator_answers_with_the_final_text(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    env = ToolEnvironment([make_tool(calculator)], tokenizer)
    tool_generator = ToolGenerator(ScriptedGenerator(tokenizer, [[CALL, "14"]]), env)
    (completion,) = tool_generator.generate(["ignored"], messages=[[{"role": "user", "content": "q"}]])
    assert completion.text == "14" and completion.completion_tokens > 2
    assert completion.tool_calls == 1 and [m["role"] for m in completion.episode] == ["assistant", "tool", "assistant"]
    assert tool_generator.eos_ids == [tokenizer.eos_token_id]  # the rest is the wrapped generator's
    with pytest.raises(ValueError, match="messages"):
        tool_generator.generate(["x"])


def test_tools_in_evaluation_and_grpo_on_the_tiny_model(tiny_model_dir, tmp_path):
    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir, max_new_tokens=6, n_validation=4),
                     ["tools=[{name: calculator}]", "tool_turns=2"])
    result = evaluate(str(tiny_model_dir), task, "validation")
    assert result.n == 4 and 0 <= result.score <= 1
    # eval.json shows each episode (its turns, the calls made) and how often the model called a tool
    assert all(r.details["episode"][0]["role"] == "assistant" and r.details["tool_calls"] >= 0
               for r in result.records)
    assert result.extras["tool_calls_per_example"] == sum(r.details["tool_calls"] for r in result.records) / 4
    config = GRPOConfig(max_steps=1, prompts_per_step=2, group_size=2, batch_size=4, r=4, precision="fp32",
                        eval_every=0, dynamic_sampling=False, max_new_tokens=6)
    grpo(task, config, out=tmp_path / "run")
    (train,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "train"]
    assert train["tool_calls"] >= 0 and train["updates"] == 1
    assert torch.isfinite(torch.tensor(train["loss"]))
