"""`hone tune`: train extra parameters (LoRA, DoRA, IA3, prompt tuning, ... full fine-tuning) -> Artifact."""

from __future__ import annotations

import typer

from honellm.cli.common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("tune", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def tune_command(ctx: typer.Context):
        """Train extra parameters (LoRA, DoRA, IA3, prompt tuning, ... full fine-tuning) -> Artifact."""
        not_yet("tune", 5, "tuning (LoRA and the other PEFT methods, full fine-tuning)")
