"""`hone demo`: the main job on the embedded model: compare methods on the built-in tasks in minutes."""

from __future__ import annotations

import time

import typer

from honellm.cli.common import echo


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_command(
        out: str = typer.Option(None, "--out", "-o", help="demo folder (default: runs/demo-<time>/)"),
        tasks: str = typer.Option(None, "--tasks", help="comma-separated demo tasks, replacing the default intents,support_prefs (add arithmetic for GRPO, ~10 more minutes)"),
        limit: int = typer.Option(None, "--limit", help="judge each method on the first N test examples"),
        force: bool = typer.Option(False, "--force", help="replace an existing --out folder"),
    ):
        """Compare prompting, tuning and reward-based methods on the built-in tasks with the embedded model.

        Sized to finish in under 10 minutes on 2 CPU cores; prints each leaderboard and writes one HTML report.
        """
        from honellm.compare.demo import run_demo

        started = time.perf_counter()
        names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
        root, runs, report = run_demo(out, tasks=names, limit=limit, force=force, echo=echo)
        echo(f"\ndemo finished in {(time.perf_counter() - started) / 60:.1f} min: {root}")
        echo(f"report: {report}")
