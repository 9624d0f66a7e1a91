"""`hone data check FILE_OR_TASK`: validate data and show its shape before spending compute on it."""

from __future__ import annotations

import typer
from rich.table import Table

from honellm.cli.common import console, echo, json_out

data_app = typer.Typer(help="Inspect and validate data.", no_args_is_help=True)


@data_app.command("check")
def check(
    file_or_task: str = typer.Argument(..., help="a data file (JSONL, JSON, CSV/TSV, Parquet, datasets folder) or a task YAML"),
    overrides: list[str] = typer.Argument(None, help="task overrides key=value", show_default=False),
    model: str = typer.Option(None, "--model", help="tokenizer for the length statistics (default: the task's model)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
):
    """Report the format found, records per split, token length statistics, and every problem (exit 1 if any)."""
    from dataclasses import asdict

    from honellm.data.check import check_data

    report = check_data(file_or_task, model=model, overrides=overrides or [])
    if as_json:
        json_out(asdict(report) | {"problems": [str(p) for p in report.problems]})
        raise SystemExit(1 if report.problems else 0)
    echo(f"source: {report.source}")
    echo(f"format: {report.format} (trains: {report.kind})   tokenizer: {report.model}")
    table = Table(title="Records and token lengths (min / mean / p50 / p95 / max)")
    table.add_column("split")
    table.add_column("records", justify="right")
    table.add_column("problems", justify="right")
    kinds = list(dict.fromkeys(k for s in report.splits for k in s.lengths))
    for k in kinds:
        table.add_column(f"{k} tokens")
    for s in report.splits:
        cells = []
        for k in kinds:
            st = s.lengths.get(k)
            cells.append(f"{st.min} / {st.mean:.1f} / {st.p50} / {st.p95} / {st.max}" if st else "-")
        table.add_row(s.name, str(s.records), str(len(s.problems)), *cells)
    console.print(table)
    if report.problems:
        echo(f"{len(report.problems)} problem(s):")
        for p in report.problems:
            echo(f"  {p}")
        echo("fix them, or pass --skip-invalid to the training command to skip these records")
        raise SystemExit(1)
    echo("no problems found")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
