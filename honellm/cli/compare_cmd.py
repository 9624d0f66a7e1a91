"""`hone compare`: run several methods on the same task and budget and print a leaderboard."""

from __future__ import annotations

import typer

from honellm.cli.common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("compare", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def compare_command(ctx: typer.Context):
        """Run several methods on the same task and budget and print a leaderboard."""
        not_yet("compare", 7, "compare")
