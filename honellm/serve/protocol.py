"""The OpenAI wire format: request validation and the response and chunk objects.

Requests are validated strictly (a string where a number belongs is a 400, not a silent coercion), NaN and
infinities are refused, and every parameter OpenAI defines but this server cannot honour (penalties, logit bias,
the deprecated `functions`, ...) is a clear 400 when set to anything but its neutral value. Fields OpenAI
adds later are accepted and ignored, so newer clients keep working.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from honellm.serve.errors import bad_request, unsupported

Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_CHOICES = 16  # n (times the number of prompts) per request; each choice is one row of a batch
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's limit for chat; vLLM's for both endpoints)
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


class _Strict(BaseModel):
    # strict: no "5" -> 5 or 1 -> True coercions; extra="allow": unknown (newer) OpenAI fields are ignored.
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Sampling(_Strict):
    """What chat and text completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: int | None = Field(None, ge=0)  # not OpenAI's, but vLLM's and common; sent through extra_body
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[Any] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[Any]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


# ------------------------------------------------------------------------------------------------------- parsing


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object; anything else (bad JSON, NaN, a list, bad UTF-8) is a 400."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    return data


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def validate(model: type[BaseModel], data: dict):
    """`model.model_validate(data)`, with pydantic's errors turned into one OpenAI-style 400."""
    try:
        request = model.model_validate(data)
    except ValidationError as err:
        # A union field (content: str | list) fails once per alternative: one problem per field, alternatives joined.
        problems: dict[str | None, list[str]] = {}
        for problem in err.errors(include_url=False):
            messages = problems.setdefault(_param(problem["loc"]), [])
            if problem["msg"] not in messages:
                messages.append(problem["msg"])
        param, messages = next(iter(problems.items()))
        text = messages[0] + "".join(f", or {m[0].lower()}{m[1:]}" for m in messages[1:])
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise bad_request(f"{param or 'body'}: {text}{more}", param=param) from None
    _check_unicode(data)
    return request


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|.*[\[(].*)$")


def _param(loc: tuple) -> str | None:
    """A dotted field path from a pydantic location, without the union-member tags pydantic adds."""
    parts = [str(p) for p in loc if isinstance(p, int) or not _TYPE_TAG.match(str(p))]
    return ".".join(parts) or None


def _check_unicode(value: Any, path: str = "") -> None:
    """JSON may carry lone surrogates (\\ud800), which no tokenizer can encode: refuse them with the field's name."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request(f"{path or 'body'}: the text is not valid Unicode (a lone surrogate)",
                              param=path or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, path)
            _check_unicode(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_unicode(item, f"{path}.{i}")


def refuse_unsupported(request: _Sampling) -> None:
    """A 400 for every parameter that is set to something this server cannot do."""
    if request.presence_penalty:
        raise unsupported("presence_penalty", "presence_penalty other than 0")
    if request.frequency_penalty:
        raise unsupported("frequency_penalty", "frequency_penalty other than 0")
    if request.logit_bias:
        raise unsupported("logit_bias", "logit_bias")
    if isinstance(request, ChatRequest):
        if request.functions:
            raise unsupported("functions", "the deprecated functions parameter (send tools instead)")
        if request.function_call not in (None, "none", "auto"):
            raise unsupported("function_call", "the deprecated function_call parameter (send tool_choice instead)")
        if request.top_logprobs and not request.logprobs:
            raise bad_request("top_logprobs: needs logprobs set to true", param="top_logprobs")
    else:
        if request.suffix:
            raise unsupported("suffix", "suffix (insertion)")
        if request.best_of is not None and request.best_of != (request.n or 1):
            raise unsupported("best_of", "best_of other than n")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP:
        raise bad_request(f"stop: at most {MAX_STOP} stop sequences are allowed (got {len(stops)})", param="stop")
    if any(not s for s in stops):
        raise bad_request("stop: stop sequences must be non-empty strings", param="stop")
    return tuple(stops)


def message_text(message: ChatMessage, index: int) -> dict:
    """One chat message as `{"role", "content"}` with plain-text content; images, audio and tools are refused."""
    role = message.role
    if role == "developer":  # OpenAI's newer name for the system role
        role = "system"
    if role not in ("system", "user", "assistant", "tool"):
        if role == "function":
            raise unsupported(f"messages.{index}.role", "role 'function' (deprecated: send role 'tool')")
        raise bad_request(f"messages.{index}.role: must be one of system, developer, user, assistant, tool "
                          f"(got {role!r})", param=f"messages.{index}.role")
    if role == "tool" and not message.tool_call_id:
        raise bad_request(f"messages.{index}.tool_call_id: a tool message needs the id of the call it answers",
                          param=f"messages.{index}.tool_call_id")
    if message.tool_calls is not None and role != "assistant":
        raise bad_request(f"messages.{index}.tool_calls: only assistant messages carry tool calls",
                          param=f"messages.{index}.tool_calls")
    content = message.content
    if content is None:
        if role != "assistant":
            raise bad_request(f"messages.{index}.content: a {role} message needs content",
                              param=f"messages.{index}.content")
        content = ""
    elif isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            where = f"messages.{index}.content.{j}"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad_request(f"{where}: a content part must be an object with a type", param=where)
            if part["type"] != "text":
                raise unsupported(where, f"content of type {part['type']!r} (this server takes text only)")
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{where}.text: must be a string", param=f"{where}.text")
            texts.append(part["text"])
        content = "".join(texts)
    out: dict[str, Any] = {"role": role, "content": content}
    if message.tool_calls:
        from honellm.serve.tools import check_tool_calls

        out["tool_calls"] = check_tool_calls(message.tool_calls, index)
    if role == "tool":
        out["tool_call_id"] = message.tool_call_id
    return out


def response_format_schema(response_format: dict | None) -> dict | None:
    """The JSON Schema `response_format` asks for (`{"type": "object"}` for JSON mode); None for plain text."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMATS:
        raise bad_request(f"response_format.type: must be one of {', '.join(RESPONSE_FORMATS)} (got {kind!r})",
                          param="response_format.type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("response_format.json_schema: required with type json_schema: "
                          "{\"name\": ..., \"schema\": {...}}", param="response_format.json_schema")
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)):
        raise bad_request("response_format.json_schema.name: must be 1-64 letters, digits, '_' or '-'",
                          param="response_format.json_schema.name")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict | bool):
        raise bad_request("response_format.json_schema.schema: must be a JSON Schema object",
                          param="response_format.json_schema.schema")
    return schema


def completion_prompts(prompt: str | list[Any]) -> list[str]:
    """`prompt` as a list of strings; token-id prompts are refused (the server formats text)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt: must be a string or a non-empty list of strings", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt) or all(isinstance(p, list) for p in prompt):
        raise unsupported("prompt", "a prompt of token ids")
    raise bad_request("prompt: must be a string or a list of strings", param="prompt")


# ------------------------------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> bytes:
    """One server-sent event exactly as OpenAI writes it: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")
