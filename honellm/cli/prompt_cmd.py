"""`hone prompt`: build a prompt program (zero/few-shot, example selection, calibration, search) -> Artifact."""

from __future__ import annotations

import typer

from honellm.cli.common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("prompt", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def prompt_command(ctx: typer.Context):
        """Build a prompt program (zero/few-shot, example selection, calibration, search) -> Artifact."""
        not_yet("prompt", 4, "prompting (zero-shot, few-shot, selection, calibration, prompt search)")
