"""OpenAI API parity through FastAPI's TestClient on the tiny model: logprobs and top_logprobs (equal to a
transformers forward's log-softmax), response_format with JSON schemas (the grammar makes a random model's answer
valid), tools and tool_choice (rendering, parsing, constrained calls, tool turns in the history), and n > 1 with
and without streaming."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from honellm.artifact import Artifact
from honellm.generation.params import Completion
from honellm.models import load_tokenizer
from honellm.serve.app import create_app
from honellm.serve.config import ServeConfig
from honellm.serve.registry import Engine, ServedModel, load_models
from honellm.serve.testing import ScriptedGenerator
from honellm.serve.tools import parse_tool_calls, render_with_tools

pytest.importorskip("llguidance")

HELLO = [{"role": "user", "content": "Review: a gripping, funny and warm film."}]
REVIEW_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["label", "stars", "tags"],
                 "properties": {"label": {"enum": ["positive", "negative"]},
                                "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                                "tags": {"type": "array", "maxItems": 2,
                                         "items": {"type": "string", "maxLength": 3}}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}}}}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def models(tiny_model_dir, one_thread):
    return load_models([f"tiny={tiny_model_dir}"], dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(models, ServeConfig(max_tokens_limit=128))) as c:
        yield c


def chat(client, messages=HELLO, **fields):
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 8,
                                                         "temperature": 0, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def validate(value, schema) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(value, schema)


def reference_steps(tiny_model, prompt: str, steps: int) -> list[torch.Tensor]:
    """transformers' greedy decoding of `prompt`: the log-softmax of the logits at every step (fp32)."""
    model, tok = tiny_model
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    return [logits[0].float().log_softmax(-1) for logits in out.logits]


# ------------------------------------------------------------------------------------------------- logprobs


def test_chat_logprobs_and_top_logprobs_equal_a_transformers_forward(client, models, tiny_model):
    body = chat(client, max_tokens=6, logprobs=True, top_logprobs=4)
    content = body["choices"][0]["logprobs"]["content"]
    prompt = models[0].engine.render(HELLO)
    steps = reference_steps(tiny_model, prompt, len(content))
    tok = tiny_model[1]
    for entry, step in zip(content, steps, strict=True):
        values, ids = step.topk(4)
        assert entry["logprob"] == pytest.approx(values[0].item(), abs=1e-4)  # greedy: the chosen is the top one
        assert [a["logprob"] for a in entry["top_logprobs"]] == pytest.approx(values.tolist(), abs=1e-4)
        assert [bytes(a["bytes"]) for a in entry["top_logprobs"]] == models[0].engine.token_bytes(ids.tolist())
        assert entry["token"] == tok.decode([ids[0].item()])
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
    assert "".join(bytes(e["bytes"]).decode("utf-8", "replace") for e in content) == \
        body["choices"][0]["message"]["content"]


def test_completion_logprobs_k_equal_a_transformers_forward(client, tiny_model):
    prompt = "Review: a"
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 5,
                                                "temperature": 0, "logprobs": 3}).json()
    logprobs = body["choices"][0]["logprobs"]
    steps = reference_steps(tiny_model, prompt, len(logprobs["tokens"]))
    for i, step in enumerate(steps):
        values, _ = step.topk(3)
        assert logprobs["token_logprobs"][i] == pytest.approx(values[0].item(), abs=1e-4)
        assert len(logprobs["top_logprobs"][i]) <= 3  # a dict: tokens with the same text share one entry
        assert max(logprobs["top_logprobs"][i].values()) == pytest.approx(values[0].item(), abs=1e-4)
    assert logprobs["text_offset"][0] == 0 and len(logprobs["text_offset"]) == len(logprobs["tokens"])


def test_streamed_logprobs_arrive_in_the_last_chunk(client):
    whole = chat(client, max_tokens=6, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"]
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 6,
                                                         "temperature": 0, "stream": True, "logprobs": True,
                                                         "top_logprobs": 2})
    chunks = [json.loads(e[6:]) for e in response.text.split("\n\n") if e and e != "data: [DONE]"]
    streamed = [t for c in chunks for t in ((c["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert streamed == whole and chunks[-1]["choices"][0]["logprobs"]["content"] == whole


def test_sampled_logprobs_are_the_raw_models_not_the_tempered(client, models, tiny_model):
    """With a temperature, the reported distribution is still the model's own (temperature 1), as vLLM does."""
    body = chat(client, max_tokens=1, logprobs=True, top_logprobs=3, temperature=1.9, seed=1)
    entry = body["choices"][0]["logprobs"]["content"][0]
    step = reference_steps(tiny_model, models[0].engine.render(HELLO), 1)[0]
    assert [a["logprob"] for a in entry["top_logprobs"]] == pytest.approx(step.topk(3).values.tolist(), abs=1e-4)


# ------------------------------------------------------------------------------------------ response_format


def test_json_schema_answer_parses_and_validates(client):
    """The tiny model has random weights: only the grammar can make its answers valid, and it does, every time."""
    for temperature, seed in ((0, None), (1.0, 7)):
        body = chat(client, max_tokens=64, temperature=temperature, seed=seed, n=3, response_format={
            "type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW_SCHEMA, "strict": True}})
        for choice in body["choices"]:
            assert choice["finish_reason"] == "stop", choice
            validate(json.loads(choice["message"]["content"]), REVIEW_SCHEMA)
    plain = chat(client, max_tokens=16)["choices"][0]["message"]["content"]
    assert not plain.startswith("{")  # without the grammar it writes no JSON at all


def test_json_object_mode_answers_an_object(client):
    body = chat(client, max_tokens=32, response_format={"type": "json_object"})
    content = body["choices"][0]["message"]["content"]
    assert content.startswith("{")
    if body["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)


def test_json_schema_in_a_stream(client):
    response = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": HELLO, "max_tokens": 64, "temperature": 0, "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW_SCHEMA}}})
    chunks = [json.loads(e[6:]) for e in response.text.split("\n\n") if e and e != "data: [DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    validate(json.loads(text), REVIEW_SCHEMA)


# ---------------------------------------------------------------------------------------------------- tools


def test_tool_choice_required_gives_a_valid_call(client):
    body = chat(client, max_tokens=96, tools=[WEATHER, TIME], tool_choice="required")
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    spec = {"get_weather": WEATHER, "get_time": TIME}[call["function"]["name"]]
    validate(json.loads(call["function"]["arguments"]), spec["function"]["parameters"])


def test_named_tool_choice_calls_that_function(client):
    body = chat(client, max_tokens=96, tools=[WEATHER, TIME],
                tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time"
    validate(json.loads(call["function"]["arguments"]), TIME["function"]["parameters"])


def test_streamed_tool_call_arrives_as_tool_call_deltas(client):
    response = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": HELLO, "max_tokens": 96, "temperature": 0, "stream": True,
        "tools": [WEATHER], "tool_choice": "required"})
    chunks = [json.loads(e[6:]) for e in response.text.split("\n\n") if e and e != "data: [DONE]"]
    calls = [d["tool_calls"][0] for c in chunks for d in [c["choices"][0]["delta"]] if "tool_calls" in d]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_history_is_rendered_for_a_template_without_tools(client, models):
    """The tiny model's ChatML template knows no tools: they go into the system prompt, the earlier call and its
    result are written out as Hermes blocks, and the request is answered."""
    history = [*HELLO, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"}]
    body = chat(client, messages=history, tools=[WEATHER])
    assert body["choices"][0]["message"]["role"] == "assistant"
    from honellm.serve.protocol import ChatMessage, message_text

    messages = [message_text(ChatMessage.model_validate(m), i) for i, m in enumerate(history)]
    prompt = models[0].engine.render(messages, [WEATHER["function"]])
    assert "<tools>" in prompt and '"get_weather"' in prompt and "<|im_start|>system" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n22 C and sunny\n</tool_response>" in prompt


def test_a_template_with_tool_support_gets_them_itself(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}{% if m.name %}({{ m.name }}){% endif %}: {{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
        "\n{% endfor %}assistant:")
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    prompt = render_with_tools(tok, messages, [WEATHER["function"]])
    assert prompt.startswith("TOOLS:get_weather;") and "<tools>" not in prompt
    assert 'CALL get_weather {"city": "Rome"}' in prompt and "tool(get_weather): sunny" in prompt


@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": {"zone": 1}}</tool_call>', "Let me check.",
     [("get_weather", {"city": "Rome"}), ("get_time", {"zone": 1})]),
    ('{"name": "get_time", "parameters": {"zone": 2}}', None, [("get_time", {"zone": 2})]),  # Llama 3
    ('<|python_tag|>{"name": "get_time", "parameters": {"zone": 3}}', None, [("get_time", {"zone": 3})]),
    ('[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": 4}}]', None, [("get_time", {"zone": 4})]),
    ('```json\n{"name": "get_time", "arguments": "{\\"zone\\": 5}"}\n```', None, [("get_time", {"zone": 5})]),
    ('{"name": "rm_rf", "arguments": {}}', '{"name": "rm_rf", "arguments": {}}', []),  # not offered: content
    ('<tool_call>{"name": "get_time", "arguments": {oops}</tool_call>', None, []),  # broken: content
    ("It is sunny.", "It is sunny.", []),
    ('{"city": "Paris"}', '{"city": "Paris"}', []),
])
def test_tool_calls_are_parsed_from_common_formats(text, content, calls):
    got_content, got = parse_tool_calls(text, {"get_weather", "get_time"})
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert got_content == (content if content is not None or calls else text)
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)


def test_auto_tool_choice_reads_calls_and_none_leaves_text(tiny_model_dir):
    class Caller(ScriptedGenerator):
        def generate(self, prompts, params, *, shared_prefix=None, progress=False):
            self.calls.append(list(prompts))
            return [Completion('<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}'
                               "</tool_call>", [5, 0], "stop", 3, 2) for _ in prompts]

    generator = Caller(max_length=4096)  # the tools description is long in the tiny byte-level vocabulary
    engine = Engine("scripted", None, load_tokenizer(tiny_model_dir), generator, generator.max_length)
    served = ServedModel("scripted", "scripted", Artifact.zero_shot(str(tiny_model_dir)), engine)
    with TestClient(create_app([served], ServeConfig())) as c:
        response = c.post("/v1/chat/completions", json={"messages": HELLO, "tools": [WEATHER]})
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome", "unit": "C"}
        assert "get_weather" in generator.calls[-1][0]  # the tools were in the prompt
        body = c.post("/v1/chat/completions", json={"messages": HELLO, "tools": [WEATHER], "tool_choice": "none"}).json()
        assert body["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in body["choices"][0]["message"]


# ------------------------------------------------------------------------------------------------------- n


def test_n_choices_each_with_its_index(client):
    body = chat(client, max_tokens=6, n=3, temperature=1.0, seed=3)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in body["choices"]}) > 1  # sampled independently
    assert 3 <= body["usage"]["completion_tokens"] <= 3 * 6


def test_n_choices_stream_with_their_indexes(client):
    whole = chat(client, max_tokens=6)["choices"][0]["message"]["content"]
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 6,
                                                         "temperature": 0, "n": 2, "stream": True,
                                                         "stream_options": {"include_usage": True}})
    chunks = [json.loads(e[6:]) for e in response.text.split("\n\n") if e and e != "data: [DONE]"]
    texts, finishes = {0: "", 1: ""}, {}
    for c in chunks:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: whole, 1: whole} and set(finishes) == {0, 1}
    assert chunks[-1]["usage"]["completion_tokens"] == 2 * chat(client, max_tokens=6)["usage"]["completion_tokens"]
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "Review:", "max_tokens": 4,
                                                    "temperature": 0, "n": 2, "stream": True})
    indexes = {json.loads(e[6:])["choices"][0]["index"] for e in response.text.split("\n\n")
               if e and e != "data: [DONE]"}
    assert indexes == {0, 1}


def test_scripted_stream_of_n_choices_recounts_usage(tiny_model_dir):
    """An engine that returns no Completions from its stream still gets each choice's finish and usage."""
    generator = ScriptedGenerator(pieces=("o", "k"))
    engine = Engine("scripted", None, load_tokenizer(tiny_model_dir), generator, generator.max_length)
    served = ServedModel("scripted", "scripted", Artifact.zero_shot(str(tiny_model_dir)), engine)
    with TestClient(create_app([served], ServeConfig())) as c:
        response = c.post("/v1/chat/completions", json={"messages": HELLO, "n": 2, "stream": True,
                                                        "stream_options": {"include_usage": True}})
        chunks = [json.loads(e[6:]) for e in response.text.split("\n\n") if e and e != "data: [DONE]"]
        texts = {0: "", 1: ""}
        for chunk in chunks:
            for choice in chunk["choices"]:
                texts[choice["index"]] += choice["delta"].get("content") or ""
        assert texts == {0: "ok", 1: "ok"} and generator.calls[-1] == [generator.calls[-1][0]] * 2
        assert sum(1 for ch in chunks for choice in ch["choices"] if choice["finish_reason"] == "stop") == 2
        assert chunks[-1]["usage"]["completion_tokens"] > 0
