"""`hone report RUN_DIR`: one self-contained HTML report of a compare run."""

from __future__ import annotations

import typer

from honellm.cli.common import echo


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_command(
        run_dir: str = typer.Argument(..., help="a folder written by `hone compare` or `hone demo`"),
        out: str = typer.Option(None, "--out", help="where to write the HTML (default: RUN_DIR/report.html)"),
    ):
        """Write the leaderboard, quality against cost, learning curves, guard panels and disagreements as HTML."""
        from honellm.compare.report import write_report

        path = write_report(run_dir, out)
        echo(f"report: {path}")
