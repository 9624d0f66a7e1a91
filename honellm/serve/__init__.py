"""OpenAI-compatible HTTP serving of artifacts: `hone serve` (see docs/serving.md).

- `registry`: names the models, loads weights once per base model, attaches adapters for per-request switching;
- `scheduler`: one worker thread per loaded model, batching concurrent requests into one generate call;
- `protocol`: the OpenAI wire format (strict request validation, response_format, response and chunk objects);
- `tools`: tool calling (checking tools and tool_choice, rendering them into the prompt, parsing calls back);
- `app`: the FastAPI routes, auth, limits and errors; `server`: `serve()` under uvicorn.
"""

from honellm.serve.config import ServeConfig

__all__ = ["ServeConfig", "serve"]


def serve(specs: list[str], config: ServeConfig) -> None:
    from honellm.serve.server import serve as _serve

    _serve(specs, config)
