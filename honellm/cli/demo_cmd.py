"""`hone demo`: the main job on the embedded model: compare methods on the built-in tasks in minutes."""

from __future__ import annotations

import typer

from honellm.cli.common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("demo", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def demo_command(ctx: typer.Context):
        """The main job on the embedded model: compare methods on the built-in tasks in minutes."""
        not_yet("demo", 7, "the demo")
