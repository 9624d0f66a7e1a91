"""The server's settings: where it listens, who may call it, and the limits that keep it up under load."""

from __future__ import annotations

from pydantic import Field

from honellm.config import Config

DEFAULT_MAX_TOKENS = 256  # when a request gives no max_tokens (OpenAI's "until the context ends" is too open)


class ServeConfig(Config):
    host: str = Field("127.0.0.1", description="address to bind; the default answers this machine only")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    api_key: str | None = Field(None, description="require `Authorization: Bearer <key>` on /v1 (None: open)")
    max_tokens_limit: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="longest prompt in tokens, after the artifact's prompt program is applied "
                                "(None: the model's context length minus one)")
    max_concurrency: int = Field(64, ge=1, description="requests admitted at once (queued or running); more get 429")
    timeout: float = Field(300.0, gt=0, description="seconds a request may take, queueing included; then 504")
    max_batch_size: int = Field(16, ge=1, description="sequences per batched generate call")
    batch_wait_ms: float = Field(
        20.0, ge=0, description="longest an idle worker waits for requests still being prepared, to batch them")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="largest request body accepted; more get 413")
    dtype: str = Field("auto", description="weights and compute dtype: auto (bf16 where fast), bf16, fp32")
    device: str | None = Field(None, description="torch device (None: CUDA if present, else CPU)")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (None: torch's default); 1 is often faster on a busy machine")
    log_level: str = Field("info", description="uvicorn log level: critical, error, warning, info, debug")
