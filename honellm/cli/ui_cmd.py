"""`hone ui`: the local web app (browse runs, start and watch them, chat with artifacts)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("ui")
    def ui_command(
        host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 answers the network: set an API key)"),
        port: int = typer.Option(7860, help="TCP port"),
        runs: str = typer.Option(None, "--runs", envvar="HONE_RUNS", show_default=False,
                                 help="the runs folder to browse and to start runs in [default: ./runs]"),
        api_key: str = typer.Option(None, "--api-key", envvar="HONE_API_KEY", show_default=False,
                                    help="require 'Authorization: Bearer KEY' on the API (also read from "
                                         "HONE_API_KEY); servers started from the UI get the same key"),
        log_level: str = typer.Option("warning", help="uvicorn log level (info shows the access log)"),
    ):
        """A local web app: browse tasks, runs and artifacts; start compare/tune/align/prompt and watch them live;
        cancel or resume; read the leaderboard and report; chat with two artifacts; serve the winner."""
        from honellm.config import validate
        from honellm.ui import UIConfig, ui

        config = validate(UIConfig, dict(host=host, port=port, runs=runs or "runs", api_key=api_key or None,
                                         log_level=log_level), source="hone ui")
        ui(config)
