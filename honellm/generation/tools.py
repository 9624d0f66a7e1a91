"""Multi-turn tool use: tools are Python functions, an episode is several assistant turns with tool calls and their
results in the chat template, and the trajectory's tokens carry a mask of what the model wrote.

- **Tools** are plain Python functions with type hints and a Google-style docstring (the convention of
  transformers' chat templates: `get_json_schema` turns them into the JSON schema a template renders). A task lists
  them in its YAML, `tools: [{name: calculator}, {python: my_tools.py:lookup}]`; built-ins are in `TOOLS`.
- **An episode** (`ToolEnvironment.run`): render the prompt with the tools (`apply_chat_template(..., tools=...)`;
  a template without tool support gets the tools described in the system turn, as vLLM and Ollama do), generate an
  assistant turn, parse its tool calls (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the Hermes/Qwen
  convention, or a bare JSON object with `name` and `arguments`/`parameters`), run them, append their results as
  `tool` turns, and generate again, until a turn calls no tool or `max_turns` turns are spent. Every active episode
  of a batch advances in one batched `Generator.generate` call per turn.
- **The trajectory** is the token ids after the prompt: each assistant turn as generated (mask 1) and, between
  turns, the template's tokens around the tool results (mask 0). GRPO over whole trajectories trains on the mask-1
  tokens only, so the model is never trained to predict what a tool returned. The final text (the last turn without
  a tool call) is what rewards and metrics read.

The prompt text of each next turn is built from the messages through the chat template and must extend the
trajectory's own tokens exactly (a template that rewrites earlier turns cannot be used for tool episodes: a clear
error says so), so that the ids the trainer scores are the ids the model was conditioned on.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from honellm.errors import HoneError
from honellm.generation.params import FINISH_LENGTH, Completion
from honellm.plugins import import_function

# ---------------------------------------------------------------------------------------------------------------
# Tools

_OPS: dict[type, Callable] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                              ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
                              ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"unsupported expression element: {type(node).__name__}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / // % ** and parentheses.

    Args:
        expression: the expression to evaluate, e.g. "12 * (3 + 4)"
    """
    text = expression.replace(",", "").replace("x", "*").replace("×", "*").replace("÷", "/").strip()
    if len(text) > 200:
        return "error: expression too long"
    try:
        value = _evaluate(ast.parse(text, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as err:
        return f"error: {err}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 6) if isinstance(value, float) else value)


TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator}


@dataclass(frozen=True)
class Tool:
    """A function the model may call, with the JSON schema its chat template renders."""

    name: str
    fn: Callable[..., Any]
    schema: dict

    def __call__(self, arguments: dict) -> str:
        try:
            result = self.fn(**arguments)
        except TypeError as err:
            return f"error: bad arguments for {self.name}: {err}"
        except Exception as err:  # noqa: BLE001 - a tool's failure is the model's observation, not a crash
            return f"error: {type(err).__name__}: {err}"
        return result if isinstance(result, str) else json.dumps(result, default=str)


def make_tool(fn: Callable[..., Any], where: str = "tools") -> Tool:
    from transformers.utils import get_json_schema

    try:
        schema = get_json_schema(fn)
    except Exception as err:  # transformers raises its own error types for missing hints or docstrings
        raise HoneError(f"tool {getattr(fn, '__name__', fn)!r} cannot be described to the model: {err}",
                        where=where, fix="give the function type hints and a docstring with an Args: section "
                                         "describing every argument") from None
    return Tool(schema["function"]["name"], fn, schema)


def load_tools(specs: Sequence[dict | str], base_dir: str | Path = ".", where: str = "tools") -> list[Tool]:
    """Tools from a task's `tools:` specs: `{name: calculator}` (a built-in) or `{python: file.py:function}`."""
    tools = []
    for spec in specs:
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        if ("name" in spec) == ("python" in spec) or len(spec) != 1:
            raise HoneError(f"a tool spec needs exactly one of `name` or `python`, got {spec}", where=where,
                            fix="write `- {name: calculator}` or `- {python: my_tools.py:lookup}`")
        if "name" in spec:
            if spec["name"] not in TOOLS:
                raise HoneError(f"unknown tool {spec['name']!r}", where=where,
                                fix=f"built-ins: {', '.join(TOOLS)}; or `python: file.py:function`")
            fn = TOOLS[spec["name"]]
        else:
            fn, _ = import_function(str(spec["python"]), base_dir, where, kind="tool")
        tools.append(make_tool(fn, where))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise HoneError(f"two tools share a name: {names}", where=where, fix="give each tool function its own name")
    return tools


# ---------------------------------------------------------------------------------------------------------------
# Parsing tool calls from an assistant turn

# A Hermes/Qwen tool-call block (an unclosed last block runs to the end of the text). `honellm.serve.tools` reads
# the same blocks, and calls through `call_from`, for the OpenAI API.
TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _json_objects(text: str) -> list[dict]:
    """Every top-level JSON object in `text`, in order."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while (start := text.find("{", i)) != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            i = start + 1
            continue
        if isinstance(value, dict):
            found.append(value)
        i = end
    return found


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


def call_from(value: Any, names: Collection[str]) -> ToolCall | None:
    """The call a parsed JSON value describes, in the forms models write: `{"name", "arguments"}` (arguments an
    object or a JSON string of one), Llama 3's `{"name", "parameters"}`, or OpenAI's `{"type": "function",
    "function": {...}}`; None unless it names one of `names` with object arguments."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict):
        value = value["function"]
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if isinstance(name, str) and name in names and isinstance(arguments, dict):
        return ToolCall(name, arguments)
    return None


def parse_tool_calls(text: str, names: Sequence[str]) -> list[ToolCall]:
    """Tool calls in an assistant turn, read leniently (an episode's small model may wrap its call in prose):
    `<tool_call>{json}</tool_call>` blocks, else bare JSON objects anywhere that name a known tool (`call_from`'s
    forms). `honellm.serve.tools.parse_tool_calls` is the strict reading for the API."""
    blocks = TOOL_CALL_BLOCK.findall(text)
    candidates = [obj for block in blocks for obj in _json_objects(block)] if blocks else _json_objects(text)
    return [call for call in (call_from(obj, names) for obj in candidates) if call is not None]


# ---------------------------------------------------------------------------------------------------------------
# Episodes


@dataclass
class Trajectory:
    """One episode after its prompt: the tokens (model turns and tool turns), the loss mask, and its record."""

    token_ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1 on tokens the model generated, 0 on tool-result turns
    messages: list[dict] = field(default_factory=list)  # the conversation after the prompt
    final_text: str = ""
    tool_calls: int = 0
    tool_errors: int = 0
    finish_reason: str = FINISH_LENGTH
    logprobs: list[float] = field(default_factory=list)

    def completion(self, prompt_tokens: int) -> Completion:
        """A `Completion` whose text is the final answer and whose tokens are the whole trajectory."""
        return Completion(text=self.final_text, token_ids=list(self.token_ids), finish_reason=self.finish_reason,
                          prompt_tokens=prompt_tokens, completion_tokens=len(self.token_ids),
                          logprobs=list(self.logprobs) or None, episode=list(self.messages),
                          tool_calls=self.tool_calls)


TOOL_SYSTEM_FALLBACK = (
    "You can call these tools:\n{tools}\n\nTo call a tool, reply with <tool_call>{{\"name\": ..., \"arguments\": "
    "{{...}}}}</tool_call> and nothing else; its result comes back in the next message. When you have the answer, "
    "reply without a tool call."
)


class ToolEnvironment:
    """Run episodes of several turns with tools (see the module docstring)."""

    def __init__(self, tools: Sequence[Tool], tokenizer, *, max_turns: int = 4, max_result_chars: int = 400):
        if not tools:
            raise ValueError("a ToolEnvironment needs at least one tool")
        self.tools = {t.name: t for t in tools}
        self.tokenizer = tokenizer
        self.max_turns = max_turns
        self.max_result_chars = max_result_chars
        self.native = self._template_takes_tools()

    def _template_takes_tools(self) -> bool:
        """Whether the chat template renders `tools` (some ignore them silently: then the system turn says)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return False
        probe = [{"role": "user", "content": "x"}]
        schemas = [t.schema for t in self.tools.values()]
        try:
            with_tools = self.tokenizer.apply_chat_template(probe, tools=schemas, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that raises on tools does not take them
            return False
        return with_tools != self.tokenizer.apply_chat_template(probe, tokenize=False)

    def _with_tools(self, messages: list[dict]) -> list[dict]:
        if self.native:
            return messages
        described = "\n".join(json.dumps(t.schema["function"]) for t in self.tools.values())
        note = TOOL_SYSTEM_FALLBACK.format(tools=described)
        if messages and messages[0]["role"] == "system":
            return [{"role": "system", "content": f"{messages[0]['content']}\n\n{note}"}, *messages[1:]]
        return [{"role": "system", "content": note}, *messages]

    def render(self, messages: list[dict], *, generation_prompt: bool = True) -> str:
        """The conversation as the model sees it, tools included."""
        from honellm.data.chat import has_chat_template, render_prompt

        messages = self._with_tools(messages)
        if not has_chat_template(self.tokenizer):
            return render_prompt(self.tokenizer, messages)
        kwargs = {"tools": [t.schema for t in self.tools.values()]} if self.native else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                  **kwargs)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"]

    def call(self, call: ToolCall) -> tuple[str, bool]:
        """Run one call; (its result, truncated to `max_result_chars`, and whether it failed)."""
        result = self.tools[call.name](call.arguments)
        return result[: self.max_result_chars], result.startswith("error:")

    def run(self, generator, prompts: Sequence[list[dict]], params, *, prompt_ids: Sequence[list[int]] | None = None
            ) -> list[Trajectory]:
        """Run one episode per prompt (messages), all active episodes batched each turn."""
        texts = [self.render(m) for m in prompts]
        ids = [list(p) for p in prompt_ids] if prompt_ids is not None else \
            [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        trajectories = [Trajectory() for _ in prompts]
        conversations = [list(m) for m in prompts]
        active = list(range(len(prompts)))
        for turn in range(self.max_turns):
            if not active:
                break
            completions = generator.generate([ids[i] + trajectories[i].token_ids for i in active], params)
            still = []
            for i, completion in zip(active, completions, strict=True):
                t = trajectories[i]
                t.token_ids += completion.token_ids
                t.mask += [1] * len(completion.token_ids)
                t.logprobs += list(completion.logprobs or [])
                t.finish_reason = completion.finish_reason
                calls = parse_tool_calls(completion.text, list(self.tools))
                conversations[i].append({"role": "assistant", "content": completion.text})
                t.messages.append({"role": "assistant", "content": completion.text})
                if not calls or completion.finish_reason == FINISH_LENGTH or turn == self.max_turns - 1:
                    t.final_text = completion.text
                    continue
                for call in calls:
                    result, failed = self.call(call)
                    t.tool_calls += 1
                    t.tool_errors += failed
                    message = {"role": "tool", "name": call.name, "content": result}
                    conversations[i].append(message)
                    t.messages.append(message)
                # the template's tokens after the assistant turn as generated (its end-of-turn token where the model
                # stopped on a stop string, then the tool turns and the next prompt); they take no loss
                done_text = texts[i] + self.tokenizer.decode(t.token_ids, skip_special_tokens=False)
                full = self.render(conversations[i])
                if not full.startswith(done_text):
                    raise HoneError("this model's chat template rewrites earlier turns, so a tool episode's tokens "
                                    "cannot extend the ones the model generated",
                                    fix="use a model whose template renders assistant turns verbatim (ChatML, "
                                        "Llama 3, Qwen), or no tools")
                delta_ids = self.tokenizer(full[len(done_text):], add_special_tokens=False)["input_ids"]
                t.token_ids += delta_ids
                t.mask += [0] * len(delta_ids)
                t.logprobs += [0.0] * len(delta_ids) if completion.logprobs is not None else []
                still.append(i)
            active = still
        return trajectories


class ToolGenerator:
    """A `Generator` whose `generate` runs tool episodes (for evaluation: the answer is the episode's final text).

    `takes_context`: the evaluator passes the records' messages, which episodes need to render tool turns.
    """

    takes_context = True

    def __init__(self, generator, environment: ToolEnvironment):
        self.generator, self.environment = generator, environment
        self.tokenizer = environment.tokenizer

    def generate(self, prompts, params=None, *, shared_prefix=None, messages=None, records=None, **_):
        if messages is None:
            raise ValueError("tool episodes need the prompts' messages")
        trajectories = self.environment.run(self.generator, messages, params)
        return [t.completion(len(self.environment.prompt_ids(m))) for t, m in zip(trajectories, messages,
                                                                                   strict=True)]

    def __getattr__(self, name):  # everything else (scoring, eos ids, ...) is the wrapped generator's
        return getattr(self.generator, name)
