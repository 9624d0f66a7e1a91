"""`hone serve` as a user runs it: a real server process on a free port, two LoRA artifacts of the tiny model plus
the base, driven with the official `openai` client."""

from __future__ import annotations

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


def test_bad_artifact_is_a_clear_cli_error(tmp_path):
    result = hone("serve", str(tmp_path), timeout=120)
    assert result.returncode == 2 and "not an artifact" in result.stderr
