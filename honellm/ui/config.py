"""The UI's settings: where it listens, who may call it, and where runs live."""

from __future__ import annotations

from pydantic import Field

from honellm.config import Config


class UIConfig(Config):
    host: str = Field("127.0.0.1", description="address to bind; the default answers this machine only")
    port: int = Field(7860, ge=0, le=65535, description="TCP port")
    runs: str = Field("runs", description="the runs folder to browse, and where runs started from the UI go")
    api_key: str | None = Field(None, description="require `Authorization: Bearer <key>` on /api (None: open); "
                                                   "the same check as `hone serve`")
    examples: str | None = Field(None, description="a folder of task YAMLs to list besides the built-in tasks "
                                                    "(None: ./examples when it exists)")
    python: str | None = Field(None, description="the Python that runs `python -m honellm` for started runs "
                                                  "(None: this one)")
    log_level: str = Field("warning", description="uvicorn log level: critical, error, warning, info, debug")
