"""What every CLI verb shares: console output, overrides, and turning library errors into exit codes."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from honellm.errors import HoneError

# Tables keep their shape when piped: a file or CI log gets 140 columns rather than rich's 80.
_WIDTH = None if sys.stdout.isatty() else 140
console = Console(highlight=False, soft_wrap=True, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 140)

OverridesArg = typer.Argument(None, help="dotted key=value overrides, e.g. lr=1e-4 data.test=test.jsonl", show_default=False)


def fail(error: HoneError) -> None:
    """Print a user error as plain lines (no traceback) and exit with its code."""
    err_console.print(f"[bold red]error:[/] {error.render()}", markup=True, highlight=False)
    raise SystemExit(error.exit_code)


def not_yet(verb: str, issue: int, what: str) -> None:
    err_console.print(f"hone {verb}: {what} is not available yet (issue {issue} has not landed)")
    raise SystemExit(2)


def echo(text: str = "") -> None:
    console.print(text, markup=False, highlight=False)


def json_out(data) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
