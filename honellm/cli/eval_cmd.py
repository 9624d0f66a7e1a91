"""`hone eval`: evaluate an artifact or a model on a task split: the metric with its 95% interval, and cost."""

from __future__ import annotations

import typer

from honellm.cli.common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def eval_command(ctx: typer.Context):
        """Evaluate an artifact or a model on a task split: the metric with its 95% interval, and cost."""
        not_yet("eval", 3, "evaluation")
