"""The OpenAI-compatible app through FastAPI's TestClient: happy paths on the tiny model with two LoRA adapters,
and every error status (400, 401, 404, 405, 413, 429, 500, 504) with OpenAI's error body."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from honellm.artifact import Artifact
from honellm.models import load_tokenizer
from honellm.serve.app import create_app
from honellm.serve.config import ServeConfig
from honellm.serve.registry import Engine, ServedModel, load_models
from honellm.serve.testing import ScriptedGenerator, make_lora_artifact

KEY = "test-key"
HELLO = [{"role": "user", "content": "Review: a gripping, funny and warm film."}]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    a = make_lora_artifact(tiny_model_dir, root / "a", seed=1, name="tiny-a", system="You are A.")
    b = make_lora_artifact(tiny_model_dir, root / "b", seed=2, name="tiny-b")
    return a, b


@pytest.fixture(scope="module")
def models(adapters, tiny_model_dir, one_thread):
    return load_models([str(adapters[0]), str(adapters[1]), str(tiny_model_dir)], dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def client(models):
    config = ServeConfig(api_key=KEY, max_prompt_tokens=200, max_tokens_limit=64, max_body_bytes=64 << 10)
    with TestClient(create_app(models, config), headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def base_name(models) -> str:
    return models[2].name


def chat(client, model="tiny-a", messages=HELLO, **fields):
    return client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 8,
                                                     "temperature": 0, **fields})


def assert_error(response, status: int, param: str | None = "?", code: str | None = "?"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "?":
        assert error["param"] == param, error
    if code != "?":
        assert error["code"] == code, error
    return error


def scripted_client(tiny_model_dir, generator: ScriptedGenerator, **config) -> TestClient:
    """An app whose one model answers from a ScriptedGenerator (no model runs)."""
    engine = Engine("scripted", None, load_tokenizer(tiny_model_dir), generator, generator.max_length)
    served = ServedModel("scripted", "scripted", Artifact.zero_shot(str(tiny_model_dir)), engine)
    return TestClient(create_app([served], ServeConfig(**config)))


# ------------------------------------------------------------------------------------------------ happy paths


def test_health_needs_no_key_and_lists_models(client, base_name):
    response = client.get("/health", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.json()["models"] == ["tiny-a", "tiny-b", base_name]


def test_models_list_and_retrieve(client, base_name):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["tiny-a", "tiny-b", base_name]
    assert all(m["object"] == "model" and m["owned_by"] == "hone" for m in data["data"])
    assert client.get("/v1/models/tiny-b").json()["hone"]["adapter"] is True
    assert_error(client.get("/v1/models/nope"), 404, code="model_not_found")


def test_adapters_share_one_loaded_base(models):
    assert len({id(m.engine) for m in models}) == 1
    assert [m.adapter for m in models] == ["a0", "a1", None]


def test_chat_completion_shape_and_usage(client):
    body = chat(client).json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-a" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_each_model_answers_with_its_own_adapter(client, base_name):
    texts = {name: chat(client, name, max_tokens=12).json()["choices"][0]["message"]["content"]
             for name in ("tiny-a", "tiny-b", base_name)}
    assert len(set(texts.values())) == 3, texts
    # Greedy decoding is deterministic: asking again after other adapters ran gives the same text.
    assert chat(client, "tiny-a", max_tokens=12).json()["choices"][0]["message"]["content"] == texts["tiny-a"]


def test_prompt_program_is_applied_on_the_server(client, models):
    served = models[0]
    assert served.chat_messages(HELLO)[0] == {"role": "system", "content": "You are A."}
    # The artifact's system prompt costs prompt tokens that the same request to tiny-b does not.
    with_system = chat(client, "tiny-a").json()["usage"]["prompt_tokens"]
    without = chat(client, "tiny-b", messages=[{"role": "system", "content": "x"}, *HELLO]).json()
    assert with_system > without["usage"]["prompt_tokens"]


def test_stream_is_openai_sse_and_matches_the_whole_text(client):
    body = chat(client, "tiny-b", max_tokens=10).json()
    whole = body["choices"][0]["message"]["content"]
    response = chat(client, "tiny-b", max_tokens=10, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]
    assert finals[0]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole


def test_text_completions_several_prompts_n_echo_logprobs(client, base_name):
    body = client.post("/v1/completions", json={"model": base_name, "prompt": ["Review: a", "What is 2"],
                                                "max_tokens": 4, "temperature": 0, "n": 2, "echo": True,
                                                "logprobs": 0}).json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 4
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"].startswith("Review: a") and body["choices"][2]["text"].startswith("What is 2")
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy: the n copies agree
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) and all(v <= 0 for v in logprobs["token_logprobs"])
    assert 0 < body["usage"]["completion_tokens"] <= 4 * 4 and body["usage"]["prompt_tokens"] > 0


def test_text_completion_stream(client, base_name):
    response = client.post("/v1/completions", json={"model": base_name, "prompt": "Review:", "max_tokens": 5,
                                                    "temperature": 0, "stream": True})
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]


def test_chat_logprobs(client):
    body = chat(client, logprobs=True).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert content and all(set(t) == {"token", "logprob", "bytes", "top_logprobs"} for t in content)


def test_odd_but_valid_inputs_are_answered(client):
    for messages in ([{"role": "user", "content": "héllo 😀 中文 \u0000 \u202e"}],
                     [{"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]}],
                     [{"role": "developer", "content": "be brief"}, {"role": "user", "content": ""}],
                     [*HELLO, {"role": "assistant", "content": None}, {"role": "user", "content": "again"}]):
        assert chat(client, messages=messages).status_code == 200, messages
    assert chat(client, seed=2**80, temperature=0.7, top_p=0.9, top_k=5).status_code == 200
    assert chat(client, temperature=1e-300).status_code == 200  # treated as greedy, not an overflow
    assert chat(client, stop=["\n", "."], user="u1", unknown_future_field={"x": 1}).status_code == 200


def test_model_may_be_omitted_when_only_one_is_served(tiny_model_dir):
    with scripted_client(tiny_model_dir, ScriptedGenerator()) as c:
        response = c.post("/v1/chat/completions", json={"messages": HELLO})
        assert response.status_code == 200 and response.json()["model"] == "scripted"


# ------------------------------------------------------------------------------------------------------ 401


def test_missing_wrong_and_malformed_keys_are_401(client):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": "Bearer"}):
        assert_error(client.get("/v1/models", headers=headers), 401)
        assert_error(client.post("/v1/chat/completions", headers=headers, json={}), 401)
    error = assert_error(client.get("/v1/models", headers={"Authorization": ""}), 401, code="missing_api_key")
    assert error["type"] == "authentication_error"


# ------------------------------------------------------------------------------------------------------ 404/405


def test_unknown_model_route_and_method(client):
    error = assert_error(chat(client, "no-such-model"), 404, param="model", code="model_not_found")
    assert "tiny-a" in error["message"]
    assert_error(client.post("/v1/completions", json={"model": "x", "prompt": "a"}), 404, code="model_not_found")
    assert_error(client.get("/v1/engines"), 404, code="unknown_url")
    assert_error(client.get("/v1/chat/completions"), 405)


# ------------------------------------------------------------------------------------------------------ 400


BAD_BODIES = [
    (b"", None, "invalid_json"),
    (b"{not json", None, "invalid_json"),
    (b'[{"model": "tiny-a"}]', None, "invalid_json"),
    (b'"text"', None, "invalid_json"),
    (b'{"model": "tiny-a", "messages": [], "temperature": NaN}', None, "invalid_json"),
    (b'{"model": "tiny-a", "messages": [], "max_tokens": Infinity}', None, "invalid_json"),
    (b"\xff\xfe{}", None, "invalid_json"),
    (b"[" * 20000 + b"]" * 20000, None, "invalid_json"),  # nesting deeper than the parser allows
]

BAD_FIELDS = [
    ({"messages": None}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0.tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                           "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]}, "messages.0.tool_calls.0"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
    ({"model": 5}, "model"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 5.5}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"max_tokens": 65}, "max_tokens"),
    ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": 1e308 * 10}, None),  # json.dumps writes Infinity: refused as JSON
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": 7}, "stop"),
    ({"seed": "1"}, "seed"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools.1.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": "f"}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": "json"}, "response_format"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
    ({"logprobs": 1}, "logprobs"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
]


@pytest.mark.parametrize("body,param,code", BAD_BODIES)
def test_malformed_bodies_are_400(client, body, param, code):
    response = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, 400, param=param, code=code)


@pytest.mark.parametrize("fields,param", BAD_FIELDS, ids=[str(i) for i in range(len(BAD_FIELDS))])
def test_bad_fields_are_400_naming_the_field(client, fields, param):
    body = {"model": "tiny-a", "messages": HELLO, "max_tokens": 4, **fields}
    response = client.post("/v1/chat/completions", content=json.dumps(body).encode(),
                           headers={"Content-Type": "application/json"})
    assert_error(response, 400, param=param)


@pytest.mark.parametrize("fields,param", [
    ({"prompt": None}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": [[1, 2]]}, "prompt"), ({"prompt": ["a", 5]}, "prompt"), ({"prompt": ""}, "prompt"),
    ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"), ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"echo": "yes"}, "echo"), ({"prompt": ["a", "b"], "stream": True}, "stream"),
    ({"echo": True, "stream": True}, "stream"),
])
def test_bad_completion_fields_are_400(client, base_name, fields, param):
    body = {"model": base_name, "prompt": "Review:", "max_tokens": 4, **fields}
    assert_error(client.post("/v1/completions", json=body), 400, param=param)


def test_model_is_required_when_several_are_served(client):
    assert_error(client.post("/v1/chat/completions", json={"messages": HELLO}), 400, param="model")
    assert_error(client.post("/v1/chat/completions", json={"model": None, "messages": HELLO}), 400, param="model")


# ------------------------------------------------------------------------------------------------------ 413


def test_prompt_over_the_limit_is_413(client):
    long = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 40}]
    error = assert_error(chat(client, messages=long), 413, code="context_length_exceeded")
    assert "200" in error["message"]
    assert_error(chat(client, messages=long, stream=True), 413, code="context_length_exceeded")


def test_body_over_the_limit_is_413(client):
    huge = [{"role": "user", "content": "x" * (70 << 10)}]
    assert_error(chat(client, messages=huge), 413, code="request_too_large")


# ------------------------------------------------------------------------------------------- 429, 500, 504


def test_full_server_answers_429_then_recovers(tiny_model_dir):
    gate = threading.Event()
    generator = ScriptedGenerator(gate=gate)
    with scripted_client(tiny_model_dir, generator, max_concurrency=1) as c:
        state = c.app.state.hone
        first: dict = {}
        worker = threading.Thread(target=lambda: first.setdefault("r", c.post("/v1/chat/completions",
                                                                              json={"messages": HELLO})))
        worker.start()
        deadline = time.monotonic() + 10
        while state.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        response = c.post("/v1/chat/completions", json={"messages": HELLO})
        error = assert_error(response, 429, code="server_busy")
        assert error["type"] == "rate_limit_error" and response.headers["retry-after"] == "1"
        gate.set()
        worker.join(10)
        assert first["r"].status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": HELLO}).status_code == 200
        assert state.in_flight == 0


def test_slow_generation_is_504_and_the_server_stays_up(tiny_model_dir):
    with scripted_client(tiny_model_dir, ScriptedGenerator(delay=1.0), timeout=0.2) as c:
        assert_error(c.post("/v1/chat/completions", json={"messages": HELLO}), 504, code="timeout")
        assert_error(c.post("/v1/chat/completions", json={"messages": HELLO, "stream": True}), 504, code="timeout")
        assert c.get("/health").status_code == 200
        time.sleep(1.2)
        assert c.app.state.hone.in_flight == 0


def test_generation_failure_is_500_and_the_next_request_works(tiny_model_dir):
    with scripted_client(tiny_model_dir, ScriptedGenerator(fail_on="boom")) as c:
        error = assert_error(c.post("/v1/chat/completions",
                                    json={"messages": [{"role": "user", "content": "boom"}]}), 500)
        assert error["type"] == "server_error" and "scripted failure" not in error["message"]
        assert c.post("/v1/chat/completions", json={"messages": HELLO}).status_code == 200


def test_stream_failure_ends_with_an_error_event(tiny_model_dir):
    class Failing(ScriptedGenerator):
        def stream(self, prompt, params):
            yield "a"
            raise RuntimeError("mid-stream")

    with scripted_client(tiny_model_dir, Failing()) as c:
        response = c.post("/v1/chat/completions", json={"messages": HELLO, "stream": True})
        assert response.status_code == 200
        events = [e for e in response.text.split("\n\n") if e]
        assert json.loads(events[-2][6:])["error"]["type"] == "server_error" and events[-1] == "data: [DONE]"
        assert c.app.state.hone.in_flight == 0
