"""`hone advise`: recommend which methods to try, in which order, and what each will cost."""

from __future__ import annotations

import typer

from honellm.cli.common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("advise", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def advise_command(ctx: typer.Context):
        """Recommend which methods to try, in which order, and what each will cost."""
        not_yet("advise", 7, "advise")
