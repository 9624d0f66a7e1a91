"""`serve()`: load the models, build the app, and run it under uvicorn until interrupted."""

from __future__ import annotations

import ipaddress
import sys

from honellm.errors import MissingDependency
from honellm.serve.config import ServeConfig


def serve(specs: list[str], config: ServeConfig) -> None:
    """Serve `specs` (artifact folders, model names, or NAME=PATH) with an OpenAI-compatible API.

    Models load before the socket opens, so `/health` answering means every model is ready."""
    try:
        import uvicorn

        from honellm.serve.app import create_app
    except ImportError as err:
        raise MissingDependency(f"serving needs FastAPI and uvicorn ({err.name} is missing)",
                                fix="pip install 'honellm[serve]'") from None
    from honellm.serve.registry import load_models

    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    models = load_models(specs, dtype=config.dtype, device=config.device, batch_size=config.max_batch_size)
    app = create_app(models, config)
    _banner(models, config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level,
                access_log=config.log_level in ("info", "debug"), timeout_graceful_shutdown=5)


def _banner(models, config: ServeConfig) -> None:
    shown_host = f"[{config.host}]" if ":" in config.host else config.host
    lines = [f"hone serve: http://{shown_host}:{config.port}/v1  (OpenAI-compatible; /health for readiness)"]
    for m in models:
        how = "adapter" if m.adapter else ("full weights" if m.artifact.weights_dir else "base")
        lines.append(f"  model {m.name!r}: {how} on {m.engine.description}")
    lines.append("  auth: " + ("API key required" if config.api_key else "none (pass --api-key or set HONE_API_KEY)"))
    if not config.api_key and not _loopback(config.host):
        lines.append(f"  warning: listening on {config.host} without an API key: anyone who can reach this "
                     "machine can use the models")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
