"""`hone eval`: evaluate an artifact or a model on a task split: the metric with its 95% interval, and cost."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from honellm.cli.common import OverridesArg, console, echo, json_out


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        artifact: str = typer.Argument(..., help="an artifact folder, or a model (name from `hone models` or a path) "
                                                 "evaluated zero-shot with the task's prompt"),
        overrides: list[str] = OverridesArg,
        task: str = typer.Option(None, "--task", "-t", help="task YAML or built-in task name "
                                                           "(default: the task the artifact was made for)"),
        split: str = typer.Option("test", "--split", help="train, validation or test"),
        data: Path = typer.Option(None, "--data", help="a held-out JSONL file in the task's format, evaluated as "
                                                      "its test split (writes eval-<name>.json)"),
        skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip (and count) records that do not "
                                                                       "fit the task instead of stopping"),
        limit: int = typer.Option(None, "--limit", min=1, help="evaluate only the first N records of the split"),
        out: Path = typer.Option(None, "--out", help="folder for eval.json (default: the artifact's folder, or "
                                                    "runs/<task>/eval-<timestamp>/ for a model)"),
        force: bool = typer.Option(False, "--force", help="replace an existing eval.json"),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="sequences per forward pass"),
        seed: int = typer.Option(0, "--seed", help="seed of sampling and of the bootstrap interval"),
        as_json: bool = typer.Option(False, "--json", help="print the summary as JSON instead of a table"),
    ):
        """Evaluate an artifact or a model on a task split: the metric with its 95% interval, and cost.

        Tasks with label choices are scored by log-likelihood over the choices; text metrics by generating;
        preference tasks by comparing chosen and rejected answers. Writes eval.json with every example.
        `--data FILE` scores your own held-out file instead of the task's test split (a bad record is an
        error naming file:line).
        """
        from honellm.evaluation.evaluate import evaluate_to_folder

        result, path = evaluate_to_folder(artifact, task, overrides or [], split=split, limit=limit, out=out,
                                          force=force, batch_size=batch_size, seed=seed, data=data,
                                          skip_invalid=skip_invalid)
        if as_json:
            json_out(result.summary() | {"eval_json": str(path)})
            return
        print_result(result)
        echo(f"wrote {path}")


def print_result(result) -> None:
    """The one-row table every evaluation prints, with the extras below it."""
    cost = result.cost
    where = f"{result.task}, file {result.config['data']}" if result.config.get("data") else \
        f"{result.task}/{result.split}"
    table = Table(title=f"{result.artifact.get('name')} on {where} ({result.mode})")
    for column in ("metric", "score", "95% CI", "n", "prompt tok/ex", "ex/s", "wall s", "peak MB"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    arrow = "" if result.higher_is_better else " (lower is better)"
    table.add_row(f"{result.metric}{arrow}", f"{result.score:.4f}", f"[{result.ci95[0]:.4f}, {result.ci95[1]:.4f}]",
                  str(result.n), f"{cost.prompt_tokens_per_example:.1f}", f"{cost.examples_per_second:.2f}",
                  f"{cost.wall_seconds:.1f}", f"{cost.peak_memory_mb:.0f}" if cost.peak_memory_mb else "-")
    console.print(table)
    for key, value in result.extras.items():
        echo(f"  {key}: {round(value, 4) if isinstance(value, float) else value}")
