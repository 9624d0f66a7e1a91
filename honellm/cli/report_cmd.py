"""`hone report`: write one self-contained HTML report of a compare run."""

from __future__ import annotations

import typer

from honellm.cli.common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("report", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def report_command(ctx: typer.Context):
        """Write one self-contained HTML report of a compare run."""
        not_yet("report", 7, "report")
