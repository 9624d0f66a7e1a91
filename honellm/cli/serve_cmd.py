"""`hone serve`: serve artifacts with an OpenAI-compatible API."""

from __future__ import annotations

import typer

from honellm.cli.common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def serve_command(ctx: typer.Context):
        """Serve artifacts with an OpenAI-compatible API."""
        not_yet("serve", 8, "serving")
