"""`hone export`: export an artifact as a merged model or a standalone adapter for transformers and vLLM."""

from __future__ import annotations

import typer

from honellm.cli.common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("export", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def export_command(ctx: typer.Context):
        """Export an artifact as a merged model or a standalone adapter for transformers and vLLM."""
        not_yet("export", 5, "export")
