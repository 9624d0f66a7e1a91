"""The FastAPI app: OpenAI-compatible `/v1/chat/completions`, `/v1/completions`, `/v1/models`, and `/health`.

A request goes: API key -> body (size-capped) -> JSON -> strict validation -> model lookup -> admission (at most
`max_concurrency` requests in the server, else 429) -> the artifact's prompt program and the chat template ->
prompt length check (413) -> the engine's queue -> one batched generate in the worker thread -> the OpenAI
response, or server-sent events for `stream: true`. Every refusal is an OpenAI-style error body; nothing a client
sends reaches the model unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from honellm import __version__
from honellm.errors import HoneError
from honellm.serve.config import DEFAULT_MAX_TOKENS, ServeConfig
from honellm.serve.errors import (
    AUTHENTICATION,
    NOT_FOUND,
    RATE_LIMIT,
    SERVER,
    APIError,
    bad_request,
    unsupported,
)
from honellm.serve.protocol import (
    DONE,
    MAX_CHOICES,
    ChatRequest,
    CompletionRequest,
    completion_prompts,
    message_text,
    new_id,
    now,
    parse_json,
    refuse_unsupported,
    response_format_schema,
    sse,
    stop_strings,
    usage,
    validate,
)
from honellm.serve.registry import ServedModel
from honellm.serve.scheduler import Job, Scheduler
from honellm.serve.tools import call_schema, check_tool_choice, check_tools, parse_tool_calls

log = logging.getLogger("honellm.serve")
FINGERPRINT = f"hone-{__version__}"
# Below this a temperature only overflows the logits; it means "as deterministic as possible": greedy.
MIN_TEMPERATURE = 1e-5


class ServerState:
    """What the routes share: the served models, one scheduler per engine, the limits and the admission count."""

    def __init__(self, models: list[ServedModel], config: ServeConfig):
        self.config = config
        self.models = {m.name: m for m in models}
        self.schedulers: dict[int, Scheduler] = {}
        for m in models:
            if id(m.engine) not in self.schedulers:
                self.schedulers[id(m.engine)] = Scheduler(m.engine, max_batch_size=config.max_batch_size,
                                                          batch_wait=config.batch_wait_ms / 1000)
        self.in_flight = 0
        self.served_requests = 0

    def start(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()

    def close(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.close()

    def scheduler(self, served: ServedModel) -> Scheduler:
        return self.schedulers[id(served.engine)]

    # ------------------------------------------------------------------------------------------------ checks

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise APIError(401, "no API key given; send the header 'Authorization: Bearer <key>'",
                           type=AUTHENTICATION, code="missing_api_key")
        # compare_digest: the time taken does not tell how much of the key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "incorrect API key provided", type=AUTHENTICATION, code="invalid_api_key")

    def model(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise bad_request(f"model: required; this server has {', '.join(self.models)}", param="model")
        served = self.models.get(name)
        if served is None:
            names = list(self.models)
            listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            raise APIError(404, f"the model {name!r} does not exist on this server; it serves: {listed}",
                           type=NOT_FOUND, param="model", code="model_not_found")
        return served

    def admit(self) -> None:
        """Count a request in, or refuse it with 429 when `max_concurrency` are already in the server."""
        if self.in_flight >= self.config.max_concurrency:
            raise APIError(429, f"the server is at capacity ({self.config.max_concurrency} requests in flight); "
                                "retry shortly", type=RATE_LIMIT, code="server_busy", headers={"Retry-After": "1"})
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self.served_requests += 1

    def sampling(self, request, max_tokens: int | None, param: str, *, logprobs: bool = False, top_logprobs: int = 0,
                 grammar=None):
        from honellm.generation.params import SamplingParams

        limit = self.config.max_tokens_limit
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, limit)
        elif max_tokens > limit:
            raise bad_request(f"{param}: {max_tokens} is over this server's limit of {limit}", param=param,
                              code="max_tokens_too_large")
        temperature = 1.0 if request.temperature is None else request.temperature
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0
        try:
            return SamplingParams(
                max_new_tokens=max_tokens, temperature=temperature,
                top_p=1.0 if request.top_p is None else request.top_p, top_k=request.top_k or 0,
                seed=None if request.seed is None else request.seed % 2**63, stop=stop_strings(request.stop),
                logprobs=logprobs, top_logprobs=top_logprobs, grammar=grammar)
        except HoneError as err:
            raise bad_request(err.what) from None

    async def prompt_tokens(self, served: ServedModel, prompt: str) -> int:
        count = await run_in_threadpool(served.engine.count, prompt)
        limit = served.engine.context_length - 1
        if self.config.max_prompt_tokens:
            limit = min(limit, self.config.max_prompt_tokens)
        if count > limit:
            raise APIError(413, f"the prompt has {count} tokens (with the model's prompt program and chat template), "
                                f"over this server's limit of {limit}; shorten it", param="messages",
                           code="context_length_exceeded")
        if count == 0:
            raise bad_request("the prompt is empty", param="prompt")
        return count


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (declared or actual)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------------- the app


def create_app(models: list[ServedModel], config: ServeConfig | None = None) -> FastAPI:
    """The ASGI app serving `models` (from `registry.load_models`); worker threads start here."""
    config = config or ServeConfig()
    state = ServerState(models, config)
    state.start()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        state.close()

    app = FastAPI(title="Hone", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.hone = state

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 404:
            api = APIError(404, f"no route {request.url.path}; this server has /v1/chat/completions, "
                                "/v1/completions, /v1/models and /health", type=NOT_FOUND, code="unknown_url")
        elif err.status_code == 405:
            api = APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        else:
            api = APIError(err.status_code, str(err.detail))
        return JSONResponse(api.body(), status_code=api.status, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception):
        log.error("unexpected error in a request", exc_info=err)
        api = APIError(500, f"internal error ({type(err).__name__}); see the server log", type=SERVER,
                       code="internal_error")
        return JSONResponse(api.body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(state.models), "in_flight": state.in_flight,
                "queued": sum(s.waiting() for s in state.schedulers.values()),
                "batches": sum(s.batches for s in state.schedulers.values()),
                "sequences": sum(s.sequences for s in state.schedulers.values())}

    @app.get("/v1/models")
    async def list_models(request: Request):
        state.authorize(request)
        return {"object": "list", "data": [m.describe() for m in state.models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        state.authorize(request)
        return state.model(name).describe()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        state.authorize(request)
        req = validate(ChatRequest, parse_json(await read_body(request, config.max_body_bytes)))
        served = state.model(req.model)
        refuse_unsupported(req)
        if not req.messages:
            raise bad_request("messages: at least one message is needed", param="messages")
        messages = [message_text(m, i) for i, m in enumerate(req.messages)]
        functions = check_tools(req.tools) if req.tools is not None else []
        mode, forced = check_tool_choice(req.tool_choice, functions)
        n, stream = _choices(req, state), bool(req.stream)
        grammar = _grammar(req.response_format, functions, mode, forced)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params = state.sampling(req, req.max_completion_tokens or req.max_tokens, param, logprobs=bool(req.logprobs),
                                top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0, grammar=grammar)
        calls_from = {f["name"] for f in functions} if mode != "none" else set()  # tool calls are read from these
        state.admit()
        handed_over = False
        try:
            with state.scheduler(served).preparing():
                try:
                    prompt = await run_in_threadpool(
                        lambda: served.engine.render(served.chat_messages(messages), functions or None))
                except HoneError as err:
                    raise bad_request(f"messages: {err.what}", param="messages") from None
                except Exception as err:  # noqa: BLE001 - a chat template may raise anything on odd conversations
                    raise bad_request(f"messages: the model's chat template refused them ({err})",
                                      param="messages") from None
                prompt_tokens = await state.prompt_tokens(served, prompt)
                if stream:
                    handed_over = True  # _stream releases the admission from here on
                    job = _submit_stream(state, served, [prompt] * n, params)
                else:
                    job = _submit(state, served, [prompt] * n, params)
            if stream:
                return await _stream(state, served, job, prompt_tokens, params, req, chat=True, tools=calls_from)
            completions = await _wait(state, job)
        finally:
            if not handed_over:
                state.release()
        choices = []
        for i, c in enumerate(completions):
            message, finish = _assistant_message(c.text, c.finish_reason, calls_from)
            logprobs = {"content": await _chat_logprobs(served, c)} if req.logprobs else None
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": served.name,
                "system_fingerprint": FINGERPRINT, "choices": choices,
                "usage": usage(prompt_tokens, sum(c.completion_tokens for c in completions))}

    @app.post("/v1/completions")
    async def completions(request: Request):
        state.authorize(request)
        req = validate(CompletionRequest, parse_json(await read_body(request, config.max_body_bytes)))
        served = state.model(req.model)
        refuse_unsupported(req)
        prompts = completion_prompts(req.prompt)
        n, stream = _choices(req, state, len(prompts)), bool(req.stream)
        if stream and (len(prompts) > 1 or req.logprobs is not None or req.echo):
            raise unsupported("stream", "stream with several prompts, logprobs or echo")
        params = state.sampling(req, req.max_tokens, "max_tokens", logprobs=req.logprobs is not None,
                                top_logprobs=req.logprobs or 0)
        state.admit()
        handed_over = False
        try:
            with state.scheduler(served).preparing():
                counts = [await state.prompt_tokens(served, p) for p in prompts]
                if stream:
                    handed_over = True  # _stream releases the admission from here on
                    job = _submit_stream(state, served, [prompts[0]] * n, params)
                else:
                    job = _submit(state, served, [p for p in prompts for _ in range(n)], params)
            if stream:
                return await _stream(state, served, job, counts[0], params, req, chat=False)
            results = await _wait(state, job)
        finally:
            if not handed_over:
                state.release()
        choices = []
        for i, c in enumerate(results):
            prefix = prompts[i // n] if req.echo else ""
            logprobs = await _completion_logprobs(served, c, len(prefix)) if req.logprobs is not None else None
            choices.append({"index": i, "text": prefix + c.text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason})
        return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": served.name,
                "system_fingerprint": FINGERPRINT, "choices": choices,
                "usage": usage(sum(counts), sum(c.completion_tokens for c in results))}

    return app


def _choices(request, state: ServerState, prompts: int = 1) -> int:
    n = request.n or 1
    if n * prompts > MAX_CHOICES:
        raise bad_request(f"n: at most {MAX_CHOICES} choices per request (n times the number of prompts)", param="n")
    if request.stream and n > state.config.max_batch_size:
        raise bad_request(f"n: a stream decodes its choices in one batch, at most --max-batch-size "
                          f"({state.config.max_batch_size})", param="n")
    return n


def _grammar(response_format: dict | None, functions: list[dict], mode: str, forced: str | None):
    """The grammar a chat request's answers must follow: its response_format's schema, or a tool call when
    tool_choice is "required" or names a function. Checked here, so a bad schema is a 400 before any queueing."""
    from honellm.errors import MissingDependency
    from honellm.generation.constrained import compile_grammar
    from honellm.generation.params import Grammar

    schema = response_format_schema(response_format)
    param = "response_format.json_schema.schema" if (response_format or {}).get("type") == "json_schema" \
        else "response_format"
    if mode in ("required", "named"):
        if schema is not None:
            raise bad_request("response_format: cannot be combined with tool_choice 'required' or a named function "
                              "(the answer is then a tool call)", param="response_format")
        schema, param = call_schema(functions, forced), "tools"
    if schema is None:
        return None
    grammar = Grammar.json_schema(schema)
    try:
        compile_grammar(grammar)
    except MissingDependency as err:
        raise bad_request(f"{param}: constrained decoding is not installed on this server ({err.what})", param=param,
                          code="unsupported_parameter") from None
    except HoneError as err:
        raise bad_request(f"{param}: {err.what}", param=param) from None
    return grammar


def _assistant_message(text: str, finish: str, calls_from: set[str]) -> tuple[dict, str]:
    """The choice's message and finish reason: tool calls when the text holds calls to offered functions."""
    if calls_from:
        content, calls = parse_tool_calls(text, calls_from)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": text}, finish


def _submit(state: ServerState, served: ServedModel, prompts: list[str], params) -> Job:
    """Queue the prompts on the model's engine (one job: they run in the same batch)."""
    job = Job(served, prompts, params, deadline=time.monotonic() + state.config.timeout)
    state.scheduler(served).submit(job)
    return job


async def _wait(state: ServerState, job: Job) -> list:
    """The job's completions, up to the request timeout."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(job.future), state.config.timeout)
    except asyncio.TimeoutError:
        raise APIError(504, f"the request took longer than {state.config.timeout:g} s", type=SERVER,
                       code="timeout") from None
    finally:
        if not job.future.done():
            job.cancel()  # timed out, or the client went away: drop it if it is still queued


def _submit_stream(state: ServerState, served: ServedModel, prompts: list[str], params) -> Job:
    """Queue a streamed completion (n copies of one prompt). From here on the job holds the request's admission:
    it is released when the worker is done with the job (finished, stopped, or dropped from the queue), even if
    the client vanishes before the response body ever starts."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(served, prompts, params, deadline=time.monotonic() + state.config.timeout,
              sink=lambda item: _call_soon(loop, events.put_nowait, item))
    job.events = events
    try:
        state.scheduler(served).submit(job)
    except BaseException:
        state.release()
        raise
    job.future.add_done_callback(lambda _f: _call_soon(loop, state.release))
    return job


async def _stream(state: ServerState, served: ServedModel, job: Job, prompt_tokens: int, params, req, *,
                  chat: bool, tools: set[str] | None = None) -> StreamingResponse:
    """Stream a queued job's pieces as server-sent events. The response begins once the worker has taken the
    job, so a timeout while queued is still a proper 504 rather than an error inside a 200 stream.

    With n > 1 the choices' pieces interleave, each chunk carrying its choice's index. A chat stream's
    log-probabilities (`logprobs: true`) come whole in each choice's last chunk, where clients that join
    `logprobs.content` across chunks find them. When the answer may be a
    tool call (`tools`: the functions offered), each choice's text is held back and sent whole at its end, as
    `tool_calls` deltas when it holds calls (a call cannot be recognised from its first tokens)."""
    events, deadline, n = job.events, job.deadline, len(job.prompts)
    try:
        kind, value = await asyncio.wait_for(events.get(), max(deadline - time.monotonic(), 0.001))
    except asyncio.TimeoutError:
        job.cancel()
        raise APIError(504, f"the request waited longer than {state.config.timeout:g} s", type=SERVER,
                       code="timeout") from None
    except BaseException:
        job.cancel()
        raise
    if kind == "error":
        raise value
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    ident, created = new_id("chatcmpl" if chat else "cmpl"), now()
    head = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": served.name, "system_fingerprint": FINGERPRINT}

    def chunk(delta: dict | str | None, finish: str | None = None, index: int = 0, logprobs=None) -> bytes:
        if chat:
            choice = {"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": delta or "", "logprobs": None, "finish_reason": finish}
        data = {**head, "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return sse(data)

    async def body():
        texts, finished = [[] for _ in range(n)], False
        try:
            if chat:
                for i in range(n):
                    yield chunk({"role": "assistant", "content": ""}, index=i)
            while True:
                left = deadline - time.monotonic()
                try:
                    kind, value = await asyncio.wait_for(events.get(), max(left, 0.001))
                except asyncio.TimeoutError:
                    kind, value = "error", APIError(504, "the request timed out while streaming", type=SERVER,
                                                    code="timeout")
                if kind == "delta":
                    i, piece = value
                    texts[i].append(piece)
                    if not tools:
                        yield chunk({"content": piece} if chat else piece, index=i)
                    continue
                if kind == "error":
                    yield sse(value.body())
                    break
                total = 0
                for i in range(n):
                    text = "".join(texts[i])
                    final = value[i] if value is not None else None
                    finish, completion_tokens = await _stream_end(served, final, text, prompt_tokens, params)
                    total += completion_tokens
                    if tools:
                        message, finish = _assistant_message(text, finish, tools)
                        for delta in _held_back_deltas(message):
                            yield chunk(delta, index=i)
                    logprobs = None
                    if chat and req.logprobs and final is not None:
                        logprobs = {"content": await _chat_logprobs(served, final)}
                    yield chunk(None, finish, index=i, logprobs=logprobs)
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(prompt_tokens, total)})
                break
            finished = True
            yield DONE
        finally:
            if not finished or not job.future.done():
                job.cancel()  # the client went away (or we timed out): the worker stops at its next piece

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _held_back_deltas(message: dict) -> list[dict]:
    """The deltas of a choice whose text was held back: its content, then one delta per tool call."""
    deltas = [{"content": message["content"]}] if message.get("content") else []
    for k, call in enumerate(message.get("tool_calls") or []):
        deltas.append({"tool_calls": [{"index": k, **call}]})
    return deltas


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Run `fn(*args)` on the event loop from a worker thread; nothing when the loop is gone (shutting down)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


async def _stream_end(served: ServedModel, final, text: str, prompt_tokens: int, params) -> tuple[str, int]:
    """finish_reason and completion tokens of a finished stream: exact when the engine hands back its Completion,
    else recounted from the text (the end-of-turn token counts as one)."""
    if final is not None and hasattr(final, "finish_reason"):
        return final.finish_reason, final.completion_tokens
    tokens = await run_in_threadpool(served.engine.count, text) if text else 0
    room = min(params.max_new_tokens, served.engine.context_length - prompt_tokens)
    if tokens >= room:
        return "length", room
    return "stop", tokens + 1


async def _chat_logprobs(served: ServedModel, completion) -> list[dict]:
    """OpenAI's `logprobs.content`: each token with its log-probability, bytes and (top_logprobs) alternatives."""
    ids, values, tops = _content_logprobs(served, completion)
    texts, raw = await _describe_tokens(served, ids, tops)
    out = []
    for i, (token_id, value) in enumerate(zip(ids, values, strict=True)):
        alternatives = [{"token": texts[t], "logprob": v, "bytes": list(raw[t])} for t, v in tops[i]] if tops else []
        out.append({"token": texts[token_id], "logprob": value, "bytes": list(raw[token_id]),
                    "top_logprobs": alternatives})
    return out


async def _completion_logprobs(served: ServedModel, completion, start: int) -> dict:
    """The legacy completions' `logprobs`: tokens, token_logprobs, top_logprobs ({token: logprob} per position,
    `logprobs` of them; None for logprobs=0) and text_offset."""
    ids, values, tops = _content_logprobs(served, completion)
    texts, _ = await _describe_tokens(served, ids, tops)
    pieces = [texts[i] for i in ids]
    offsets, at = [], start
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    top = [{texts[t]: v for t, v in step} for step in tops] if tops else None
    return {"tokens": pieces, "token_logprobs": values, "top_logprobs": top, "text_offset": offsets}


def _content_logprobs(served: ServedModel, completion) -> tuple[list[int], list[float], list | None]:
    """The generated tokens, their log-probabilities and alternatives, without a final end-of-turn token."""
    ids, values = list(completion.token_ids), list(completion.logprobs or [])
    tops = getattr(completion, "top_logprobs", None)
    eos = getattr(served.engine.generator, "eos_ids", set())
    if ids and ids[-1] in eos:
        ids = ids[:-1]
    return ids, values[: len(ids)], (list(tops[: len(ids)]) if tops else None)


async def _describe_tokens(served: ServedModel, ids: list[int], tops) -> tuple[dict[int, str], dict[int, bytes]]:
    """Text and bytes of every token that appears in an answer or among its alternatives."""
    every = sorted({*ids, *(t for step in tops or [] for t, _ in step)})
    texts = await run_in_threadpool(served.engine.token_texts, every)
    raw = await run_in_threadpool(served.engine.token_bytes, every)
    return dict(zip(every, texts, strict=True)), dict(zip(every, raw, strict=True))
