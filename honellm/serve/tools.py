"""Tool (function) calling: OpenAI's `tools` / `tool_choice` checked, rendered into the prompt, and parsed back.

Rendering. A chat template that knows tools (Qwen, Llama 3.1+, Mistral, Hermes, SmolLM3, ...: its source refers
to `tools`) gets them as Hugging Face defines: `apply_chat_template(messages, tools=...)`, assistant turns with
`tool_calls` (arguments as objects) and `tool` turns with their `tool_call_id`. A template without tool support
gets a fallback: the tools described as JSON in the system prompt, with the Hermes convention for calls, the
format many open models are tuned on (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`); earlier calls
are written back in that form and tool results become user turns in `<tool_response>` tags.

Parsing. The generated text is read as tool calls in the formats models are trained on: Hermes/Qwen
`<tool_call>{json}</tool_call>` blocks (text around them is the message content), or the whole answer being a JSON
object, or a list of them, with `name` and `arguments` (OpenAI-like) or `parameters` (Llama 3), optionally after
`<|python_tag|>` or `[TOOL_CALLS]` or inside a code fence. Only functions the request offered count; anything
else stays plain content. No library does this for Hugging Face templates without a serving engine around it
(vLLM's parsers are tied to its own request classes), so it is written here, in the formats vLLM's hermes,
llama3_json and mistral parsers read.

`tool_choice` "required" or a named function constrains the answer with a grammar (see
`generation.constrained`): a JSON object `{"name": ..., "arguments": {...}}` whose arguments follow the function's
parameter schema, so a valid call comes out of any model.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from honellm.generation.tools import TOOL_CALL_BLOCK, call_from
from honellm.serve.errors import bad_request

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
PREFIXES = ("<|python_tag|>", "[TOOL_CALLS]", "<tool_call>")
TOOL_CHOICES = ("none", "auto", "required")


# --------------------------------------------------------------------------------------------------- checking


def check_tools(tools: list[Any]) -> list[dict]:
    """The request's `tools` as `[{"name", "description", "parameters"}]`; a 400 naming the field otherwise."""
    functions: list[dict] = []
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise bad_request(f"{where}: a tool must be an object", param=where)
        if tool.get("type") != "function":
            raise bad_request(f"{where}.type: must be 'function' (got {tool.get('type')!r})", param=f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"{where}.function: required, an object with name, description and parameters",
                              param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise bad_request(f"{where}.function.name: must be 1-64 letters, digits, '_' or '-' (got {name!r})",
                              param=f"{where}.function.name")
        if any(f["name"] == name for f in functions):
            raise bad_request(f"{where}.function.name: {name!r} is offered twice", param=f"{where}.function.name")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise bad_request(f"{where}.function.description: must be a string", param=f"{where}.function.description")
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise bad_request(f"{where}.function.parameters: must be a JSON Schema object",
                              param=f"{where}.function.parameters")
        functions.append({"name": name, "description": description, "parameters": parameters})
    return functions


def check_tool_choice(choice: Any, functions: list[dict]) -> tuple[str, str | None]:
    """`tool_choice` as (mode, function name): mode is none, auto, required or named."""
    if choice is None:
        return ("auto" if functions else "none"), None
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise bad_request(f"tool_choice: must be none, auto, required or a function (got {choice!r})",
                              param="tool_choice")
        if choice == "required" and not functions:
            raise bad_request("tool_choice: 'required' needs tools", param="tool_choice")
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise bad_request("tool_choice: must be none, auto, required or "
                          "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
    if not any(f["name"] == name for f in functions):
        offered = ", ".join(f["name"] for f in functions) or "none"
        raise bad_request(f"tool_choice.function.name: {name!r} is not among the tools (offered: {offered})",
                          param="tool_choice.function.name")
    return "named", name


def check_tool_calls(calls: Any, index: int) -> list[dict]:
    """An assistant message's `tool_calls`, in Hugging Face's form (arguments as objects)."""
    where = f"messages.{index}.tool_calls"
    if not isinstance(calls, list):
        raise bad_request(f"{where}: must be a list", param=where)
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.{j}"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"{at}: must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                              "\"arguments\"}}}}", param=at)
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise bad_request(f"{at}.function.arguments: must be a JSON object encoded as a string",
                                  param=f"{at}.function.arguments") from None
        if not isinstance(arguments, dict):
            raise bad_request(f"{at}.function.arguments: must be a JSON object", param=f"{at}.function.arguments")
        ident = call.get("id")
        if ident is not None and not isinstance(ident, str):
            raise bad_request(f"{at}.id: must be a string", param=f"{at}.id")
        out.append({"id": ident or new_call_id(), "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


# -------------------------------------------------------------------------------------------------- rendering


def template_takes_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the tool_use one, else the default
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template


def uses_tools(messages: list[dict], functions: list[dict] | None) -> bool:
    return bool(functions) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def render_with_tools(tokenizer, messages: list[dict], functions: list[dict] | None) -> str:
    """The prompt of a conversation that offers tools or carries tool calls and results (see the module doc)."""
    from honellm.data.chat import has_chat_template, render_prompt

    tools = [{"type": "function", "function": {k: v for k, v in f.items() if v is not None}}
             for f in functions or []]
    if has_chat_template(tokenizer) and template_takes_tools(tokenizer):
        names = {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or []}
        turns = [{**m, "name": names[m["tool_call_id"]]} if m["role"] == "tool" and m.get("tool_call_id") in names
                 else m for m in messages]
        return tokenizer.apply_chat_template(turns, tools=tools or None, tokenize=False, add_generation_prompt=True)
    turns = _merge_users([_plain_turn(m) for m in messages])
    if tools:
        description = describe_tools(tools)
        if turns and turns[0]["role"] == "system":
            with_system = [{"role": "system", "content": f"{turns[0]['content']}\n\n{description}"}, *turns[1:]]
        else:
            with_system = [{"role": "system", "content": description}, *turns]
        try:
            return render_prompt(tokenizer, with_system)
        except Exception:  # noqa: BLE001 - a template that refuses system turns: tell the first user turn instead
            first = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
            if first is None:
                raise
            turns = [*turns[:first], {"role": "user", "content": f"{description}\n\n{turns[first]['content']}"},
                     *turns[first + 1:]]
    return render_prompt(tokenizer, turns)


def describe_tools(tools: list[dict]) -> str:
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to assist with the user query. The functions, as JSON Schema:\n"
            f"<tools>\n{listed}\n</tools>\n"
            "To call a function, answer with one <tool_call></tool_call> block per call, each holding a JSON object "
            "with the function's name and arguments:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _plain_turn(message: dict) -> dict:
    """A message as a template without tool support can show it: calls and results written out as text."""
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    if message.get("tool_calls"):
        calls = "\n".join(f"<tool_call>\n{json.dumps(c['function'], ensure_ascii=False)}\n</tool_call>"
                          for c in message["tool_calls"])
        content = message.get("content") or ""
        return {"role": "assistant", "content": f"{content}\n{calls}" if content else calls}
    return {"role": message["role"], "content": message["content"]}


def _merge_users(turns: list[dict]) -> list[dict]:
    """Adjacent user turns (several tool results) as one, for templates that insist on alternating roles."""
    out: list[dict] = []
    for turn in turns:
        if out and turn["role"] == "user" and out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n{turn['content']}"}
        else:
            out.append(turn)
    return out


# ----------------------------------------------------------------------------------------------- constraining


def call_schema(functions: list[dict], name: str | None = None) -> dict:
    """The JSON Schema of one call `{"name", "arguments"}` to `name` (or to any of `functions`)."""
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]}}
               for f in functions if name is None or f["name"] == name]
    return options[0] if len(options) == 1 else {"anyOf": options}


# -------------------------------------------------------------------------------------------------- parsing


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) read from a generated answer; ([text], []) when it holds no valid call."""
    if "<tool_call>" in text:
        calls = []
        for block in TOOL_CALL_BLOCK.findall(text):
            call = _as_call(_loads(block), names)
            if call is None:
                return text, []
            calls.extend(call)
        content = TOOL_CALL_BLOCK.sub("", text).strip()
        return (content or None), calls
    body = text.strip()
    for prefix in PREFIXES:
        if body.startswith(prefix):
            body = body[len(prefix):].strip()
    fenced = FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    if not body.startswith(("{", "[")):
        return text, []
    calls = _as_call(_loads(body), names)
    if calls is None:
        return text, []
    return None, calls


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _as_call(value: Any, names: set[str]) -> list[dict] | None:
    """OpenAI tool calls from a parsed JSON value (one call object, or a list of them); None unless every item is a
    call to an offered function (`generation.tools.call_from`)."""
    items = value if isinstance(value, list) else [value]
    calls = [call_from(item, names) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}} for c in calls]
