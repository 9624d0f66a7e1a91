"""`hone models`: the models usable without a network."""

from __future__ import annotations

import typer
from rich.table import Table

from honellm.cli.common import console, json_out


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models(
        paths: list[str] = typer.Argument(None, help="extra local model folders or .gguf files to describe"),
        as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
        convert: bool = typer.Option(False, "--convert", help="convert the embedded model now (otherwise on first use)"),
    ):
        """List models usable offline: the embedded default, local paths, and the local Hugging Face cache."""
        from honellm.defaults import EMBEDDED_MODELS
        from honellm.models import convert_embedded, list_models

        if convert:
            for name in EMBEDDED_MODELS:
                convert_embedded(name)
        rows = list_models(paths or [])
        if as_json:
            json_out([r.to_dict() for r in rows])
            return
        table = Table(title="Models usable without a network")
        for column in ("name", "kind", "parameters", "converted", "location"):
            table.add_column(column, overflow="fold")
        for r in rows:
            params = f"{r.parameters / 1e6:.1f}M" if r.parameters else "?"
            converted = {True: "yes", False: "no (on first use)", None: "-"}[r.converted]
            table.add_row(r.name, r.kind, params, converted, r.location)
        console.print(table)
