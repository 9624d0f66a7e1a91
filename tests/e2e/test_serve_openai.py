"""`hone serve` as a user runs it: a real server process on a free port, two LoRA artifacts of the tiny model plus
the base, driven with the official `openai` client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from honellm.serve.testing import make_lora_artifact
from tests.e2e.helpers import ROOT, hone

openai = pytest.importorskip("openai")

KEY = "e2e-key"
MESSAGES = [{"role": "user", "content": "Review: a gripping, funny and warm film."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """Start `hone serve A B base=TINY` (API key from HONE_API_KEY) and wait for /health; always stop it."""
    root = tmp_path_factory.mktemp("serve-e2e")
    a = make_lora_artifact(tiny_model_dir, root / "run-a" / "artifact", seed=1, name="tiny-a", system="You are A.")
    b = make_lora_artifact(tiny_model_dir, root / "run-b" / "artifact", seed=2, name="tiny-b")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HONE_QUIET": "1", "HONE_API_KEY": KEY,
           "OMP_NUM_THREADS": "1"}  # the tiny model gains nothing from threads, and loses a lot on a busy CPU
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "honellm", "serve", str(a), str(b), f"base={tiny_model_dir}", "--port", str(port),
             "--log-level", "warning"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"hone serve exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"hone serve did not answer /health within 120 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, model: str, **kwargs) -> str:
    response = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0, **kwargs)
    return response.choices[0].message.content


def test_models_are_listed_by_name(client):
    assert [m.id for m in client.models.list()] == ["tiny-a", "tiny-b", "base"]


def test_chat_completion(client):
    response = client.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=8, temperature=0)
    assert response.object == "chat.completion" and response.model == "tiny-a"
    assert response.choices[0].message.role == "assistant" and response.choices[0].message.content
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 0 and 0 < response.usage.completion_tokens <= 8


def test_streamed_chat_completion(client):
    whole = ask(client, "tiny-a")
    stream = client.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1
    assert finish in ("stop", "length") and usage.completion_tokens > 0


def test_adapters_chosen_by_name_answer_differently(client):
    texts = {name: ask(client, name) for name in ("tiny-a", "tiny-b", "base")}
    assert len(set(texts.values())) == 3, texts
    assert ask(client, "tiny-b") == texts["tiny-b"]  # and each is stable across switches


def test_concurrent_requests_to_mixed_adapters(client):
    expected = {name: ask(client, name) for name in ("tiny-a", "tiny-b", "base")}
    names = ["tiny-a", "tiny-b", "base"] * 4
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda name: ask(client, name), names))
    assert texts == [expected[n] for n in names]


def test_errors_reach_the_client_as_openai_exceptions(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        ask(client, "no-such-model")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-a", messages=[], max_tokens=4)
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=10**9)
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_text_completions(client):
    response = client.completions.create(model="base", prompt="Review:", max_tokens=5, temperature=0)
    assert response.object == "text_completion" and response.usage.completion_tokens > 0


REVIEW_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["label", "stars"],
                 "properties": {"label": {"enum": ["positive", "negative"]},
                                "stars": {"type": "integer", "minimum": 1, "maximum": 5}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}}}}}


def test_logprobs_and_top_logprobs(client):
    response = client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert 0 < len(content) <= 5
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.logprob == token.top_logprobs[0].logprob  # greedy: the chosen token is the most likely
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
    completion = client.completions.create(model="base", prompt="Review:", max_tokens=3, temperature=0, logprobs=2)
    assert len(completion.choices[0].logprobs.top_logprobs[0]) <= 2


def test_json_schema_answer_validates(client):
    jsonschema = pytest.importorskip("jsonschema")
    response = client.chat.completions.create(
        model="tiny-a", messages=MESSAGES, max_tokens=48, temperature=0.8, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW_SCHEMA,
                                                                 "strict": True}})
    answer = json.loads(response.choices[0].message.content)
    jsonschema.validate(answer, REVIEW_SCHEMA)


def test_parse_with_a_pydantic_model(client):
    """The client's structured-output helper (strict schema from a pydantic model) gets a parsed object."""
    from typing import Literal

    from pydantic import BaseModel

    class Review(BaseModel):
        label: Literal["positive", "negative"]
        stars: Literal[1, 2, 3, 4, 5]

    response = client.chat.completions.parse(model="base", messages=MESSAGES, max_tokens=48, temperature=0,
                                             response_format=Review)
    assert isinstance(response.choices[0].message.parsed, Review)


def test_tool_call(client):
    response = client.chat.completions.create(model="tiny-b", messages=[{"role": "user", "content": "Weather?"}],
                                              max_tokens=64, temperature=0, tools=[WEATHER], tool_choice="required")
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Rome",
                                                                                                   "Oslo")
    # The call and its result go back in the history, and the conversation goes on.
    follow = client.chat.completions.create(
        model="tiny-b", max_tokens=4, temperature=0, tools=[WEATHER],
        messages=[{"role": "user", "content": "Weather?"}, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "18 C, clear"}])
    assert follow.choices[0].message.role == "assistant"


def test_n_choices_streamed(client):
    stream = client.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=6, temperature=1.0,
                                            seed=3, n=3, stream=True)
    texts: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(texts) == [0, 1, 2]
    plain = client.chat.completions.create(model="tiny-a", messages=MESSAGES, max_tokens=6, n=2, temperature=0)
    assert [c.index for c in plain.choices] == [0, 1]


def test_bad_artifact_is_a_clear_cli_error(tmp_path):
    result = hone("serve", str(tmp_path), timeout=120)
    assert result.returncode == 2 and "not an artifact" in result.stderr
