"""Bad input against a running `hone serve`: every answer must have the expected status and the server must stay up.

It starts the server itself with an API key and small limits, serving a base model and one LoRA adapter on it (by
default the tiny random test model, made in a temporary folder; `--model` serves another base), then sends
malformed JSON, wrong types, nulls, huge numbers, bad Unicode, unsupported parameters, unknown models and routes,
missing and wrong keys, over-long prompts and bodies, and a few valid requests. After every request it checks
/health. It prints one table row per case and exits non-zero on any mismatch or if the server went down.

    python bench/bench_serve_bad_input.py [--model PATH_OR_NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KEY = "bench-key"
OK = [{"role": "user", "content": "Review: a gripping film."}]


def chat(**fields) -> dict:
    return {"model": "base", "messages": OK, "max_tokens": 4, "temperature": 0, **fields}


def cases(long_text: str) -> list[tuple[str, str, str, dict | None, bytes | dict | None, int]]:
    """(name, method, path, headers (None: the right key), body, expected status)."""
    no_key = {"Authorization": ""}
    return [
        ("valid chat", "POST", "/v1/chat/completions", None, chat(), 200),
        ("valid chat, adapter", "POST", "/v1/chat/completions", None, chat(model="lora"), 200),
        ("valid stream", "POST", "/v1/chat/completions", None, chat(stream=True), 200),
        ("valid completion", "POST", "/v1/completions", None, {"model": "base", "prompt": "Hi", "max_tokens": 3}, 200),
        ("unicode, emoji, NUL, RTL", "POST", "/v1/chat/completions", None,
         chat(messages=[{"role": "user", "content": "héllo 😀 中文 \u0000 \u202e"}]), 200),
        ("seed 2**80", "POST", "/v1/chat/completions", None, chat(seed=2**80, temperature=0.8), 200),
        ("no API key", "POST", "/v1/chat/completions", no_key, chat(), 401),
        ("wrong API key", "POST", "/v1/chat/completions", {"Authorization": "Bearer nope"}, chat(), 401),
        ("Basic instead of Bearer", "GET", "/v1/models", {"Authorization": f"Basic {KEY}"}, None, 401),
        ("models without key", "GET", "/v1/models", no_key, None, 401),
        ("malformed JSON", "POST", "/v1/chat/completions", None, b'{"model": "base", "messages": [', 400),
        ("empty body", "POST", "/v1/chat/completions", None, b"", 400),
        ("JSON array body", "POST", "/v1/chat/completions", None, b"[1, 2, 3]", 400),
        ("NaN temperature", "POST", "/v1/chat/completions", None,
         b'{"model": "base", "messages": [], "temperature": NaN}', 400),
        ("invalid UTF-8", "POST", "/v1/chat/completions", None, b'{"model": "\xff\xfe"}', 400),
        ("deep nesting", "POST", "/v1/chat/completions", None, b"[" * 50000 + b"]" * 50000, 400),
        ("lone surrogate", "POST", "/v1/chat/completions", None,
         b'{"model": "base", "messages": [{"role": "user", "content": "\\ud800"}]}', 400),
        ("messages null", "POST", "/v1/chat/completions", None, chat(messages=None), 400),
        ("messages a string", "POST", "/v1/chat/completions", None, chat(messages="hello"), 400),
        ("messages empty", "POST", "/v1/chat/completions", None, chat(messages=[]), 400),
        ("content an int", "POST", "/v1/chat/completions", None,
         chat(messages=[{"role": "user", "content": 5}]), 400),
        ("content null (user)", "POST", "/v1/chat/completions", None,
         chat(messages=[{"role": "user", "content": None}]), 400),
        ("unknown role", "POST", "/v1/chat/completions", None, chat(messages=[{"role": "x", "content": "a"}]), 400),
        ("tool role", "POST", "/v1/chat/completions", None, chat(messages=[{"role": "tool", "content": "a"}]), 400),
        ("image content", "POST", "/v1/chat/completions", None,
         chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400),
        ("model null, two served", "POST", "/v1/chat/completions", None, chat(model=None), 400),
        ("model an int", "POST", "/v1/chat/completions", None, chat(model=7), 400),
        ("max_tokens a string", "POST", "/v1/chat/completions", None, chat(max_tokens="5"), 400),
        ("max_tokens 10**30", "POST", "/v1/chat/completions", None, chat(max_tokens=10**30), 400),
        ("max_tokens over limit", "POST", "/v1/chat/completions", None, chat(max_tokens=100_000), 400),
        ("max_tokens -1", "POST", "/v1/chat/completions", None, chat(max_tokens=-1), 400),
        ("temperature a string", "POST", "/v1/chat/completions", None, chat(temperature="hot"), 400),
        ("temperature 1e308", "POST", "/v1/chat/completions", None, chat(temperature=1e308), 400),
        ("top_p 0", "POST", "/v1/chat/completions", None, chat(top_p=0), 400),
        ("stream 'yes'", "POST", "/v1/chat/completions", None, chat(stream="yes"), 400),
        ("n 10**6", "POST", "/v1/chat/completions", None, chat(n=10**6), 400),
        ("n 2 with stream", "POST", "/v1/chat/completions", None, chat(n=2, stream=True), 200),
        ("n 17 with stream", "POST", "/v1/chat/completions", None, chat(n=17, stream=True), 400),
        ("top_logprobs 3", "POST", "/v1/chat/completions", None, chat(logprobs=True, top_logprobs=3), 200),
        ("top_logprobs without logprobs", "POST", "/v1/chat/completions", None, chat(top_logprobs=3), 400),
        ("top_logprobs 50", "POST", "/v1/chat/completions", None, chat(logprobs=True, top_logprobs=50), 400),
        ("json_schema", "POST", "/v1/chat/completions", None, chat(response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["a", "b"]}}}), 200),
        ("response_format yaml", "POST", "/v1/chat/completions", None, chat(response_format={"type": "yaml"}), 400),
        ("json_schema invalid", "POST", "/v1/chat/completions", None, chat(response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}), 400),
        ("tool_choice required", "POST", "/v1/chat/completions", None, chat(
            max_tokens=32, tool_choice="required",
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"enum": [{}]}}}]), 200),
        ("tool_choice, no tools", "POST", "/v1/chat/completions", None, chat(tool_choice="required"), 400),
        ("tool_choice unknown", "POST", "/v1/chat/completions", None, chat(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}}), 400),
        ("five stop strings", "POST", "/v1/chat/completions", None, chat(stop=list("abcde")), 400),
        ("tools", "POST", "/v1/chat/completions", None, chat(tools=[{"type": "function"}]), 400),
        ("logit_bias", "POST", "/v1/chat/completions", None, chat(logit_bias={"1": 100}), 400),
        ("prompt of token ids", "POST", "/v1/completions", None, {"model": "base", "prompt": [1, 2, 3]}, 400),
        ("unknown model", "POST", "/v1/chat/completions", None, chat(model="gpt-5"), 404),
        ("unknown model, completions", "POST", "/v1/completions", None, {"model": "gpt-5", "prompt": "a"}, 404),
        ("unknown route", "GET", "/v1/engines", None, None, 404),
        ("GET on a POST route", "GET", "/v1/chat/completions", None, None, 405),
        ("prompt too long", "POST", "/v1/chat/completions", None,
         chat(messages=[{"role": "user", "content": long_text}]), 413),
        ("prompt too long, stream", "POST", "/v1/chat/completions", None,
         chat(messages=[{"role": "user", "content": long_text}], stream=True), 413),
        ("body over 8 MiB", "POST", "/v1/chat/completions", None,
         chat(messages=[{"role": "user", "content": "x" * (9 << 20)}]), 413),
        ("valid chat at the end", "POST", "/v1/chat/completions", None, chat(), 200),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model to serve [default: the tiny test model]")
    args = parser.parse_args()
    from honellm.serve.testing import make_lora_artifact

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model is None:
            from honellm.testing import make_tiny_model

            base = str(make_tiny_model(tmp / "tiny"))
        else:
            base = args.model
        lora = make_lora_artifact(base, tmp / "lora", seed=1, name="lora")
        port, log_path = free_port(), tmp / "server.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HONE_QUIET": "1"}
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "honellm", "serve", f"base={base}", str(lora), "--port", str(port),
                 "--api-key", KEY, "--max-tokens-limit", "256", "--max-prompt-tokens", "448", "--threads", "1",
                 "--log-level", "warning"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                if process.poll() is not None:
                    print(log_path.read_text())
                    return 2
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    print("the server did not come up\n" + log_path.read_text())
                    return 2
                time.sleep(0.25)
            return run_cases(url, process)
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def run_cases(url: str, process: subprocess.Popen) -> int:
    import httpx

    long_text = "The quick brown fox jumps over the lazy dog. " * 200
    rows, failures = [], 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for name, method, path, headers, body, expected in cases(long_text):
            headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                       **(headers or {})}
            content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            try:
                response = client.request(method, path, headers=headers, content=content)
                status, text = response.status_code, response.text
            except httpx.HTTPError as err:
                status, text = 0, f"{type(err).__name__}: {err}"
            shape_ok = True
            if status >= 400:
                try:
                    error = json.loads(text)["error"]
                    shape_ok = set(error) == {"message", "type", "param", "code"}
                except (ValueError, KeyError, TypeError):
                    shape_ok = False
            elif status == 200 and path.endswith("completions") and isinstance(body, dict) and body.get("stream"):
                shape_ok = text.rstrip().endswith("data: [DONE]")
            try:
                alive = httpx.get(f"{url}/health", timeout=10).status_code == 200
            except httpx.HTTPError:
                alive = False
            ok = status == expected and shape_ok and alive and process.poll() is None
            failures += not ok
            detail = json.loads(text)["error"]["message"][:70] if status >= 400 and shape_ok else ""
            rows.append((name, expected, status, "ok" if ok else "MISMATCH", "up" if alive else "DOWN", detail))
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  want  got  check     server  message")
    for name, want, got, check, up, detail in rows:
        print(f"{name:<{width}}  {want:>4}  {got:>3}  {check:<8}  {up:<6}  {detail}")
    print(f"\n{len(rows) - failures}/{len(rows)} as expected; server {'still up' if process.poll() is None else 'DOWN'}")
    return 1 if failures or process.poll() is not None else 0


if __name__ == "__main__":
    sys.exit(main())
