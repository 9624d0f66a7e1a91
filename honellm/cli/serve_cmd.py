"""`hone serve ARTIFACT [ARTIFACT ...]`: serve artifacts with an OpenAI-compatible API."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_command(
        artifacts: list[str] = typer.Argument(
            ..., help="artifact folders or model names; NAME=PATH names one. An artifact is served under its "
                      "manifest name, a model under the name given (a local folder: its folder name)",
            show_default=False),
        host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 answers the network: set an API key)"),
        port: int = typer.Option(8000, help="TCP port"),
        api_key: str = typer.Option(None, "--api-key", envvar="HONE_API_KEY", show_default=False,
                                    help="require 'Authorization: Bearer KEY' (also read from HONE_API_KEY)"),
        max_tokens_limit: int = typer.Option(1024, help="largest max_tokens a request may ask for"),
        max_prompt_tokens: int = typer.Option(None, show_default=False,
                                              help="longest prompt in tokens [default: the model's context - 1]"),
        max_concurrency: int = typer.Option(64, help="requests in the server at once (queued or running); "
                                                     "more are answered 429"),
        timeout: float = typer.Option(300.0, help="seconds a request may take, queueing included (then 504)"),
        max_batch_size: int = typer.Option(16, help="sequences per batched generate call"),
        batch_wait_ms: float = typer.Option(20.0, help="longest an idle worker waits for requests still being "
                                                       "prepared, to batch them with the first"),
        threads: int = typer.Option(None, show_default=False,
                                    help="CPU threads for torch [default: torch's]; 1 is often faster on a busy CPU"),
        dtype: str = typer.Option("auto", help="auto (bf16 where fast), bf16 or fp32"),
        device: str = typer.Option(None, show_default=False, help="torch device [default: CUDA if present, else CPU]"),
        log_level: str = typer.Option("info", help="uvicorn log level (warning hides the access log)"),
    ):
        """Serve artifacts with an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models).

        Adapters on one base model share one loaded base and switch per request; each artifact's prompt
        program (system prompt, demonstrations) is applied on the server.
        """
        from honellm.config import validate
        from honellm.serve import ServeConfig, serve

        config = validate(ServeConfig, dict(
            host=host, port=port, api_key=api_key or None, max_tokens_limit=max_tokens_limit,
            max_prompt_tokens=max_prompt_tokens, max_concurrency=max_concurrency, timeout=timeout,
            max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, dtype=dtype, device=device, threads=threads,
            log_level=log_level), source="hone serve")
        serve(artifacts, config)
