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
        check: str = typer.Option(None, "--check", metavar="MODEL",
                                  help="say which paths MODEL takes (Hone's fast paths or transformers' forward) and why"),
    ):
        """List models usable offline: the embedded default, local paths, and the local Hugging Face cache."""
        from honellm.core.support import check_paths
        from honellm.defaults import EMBEDDED_MODELS
        from honellm.models import convert_embedded, list_models

        if check:
            found = check_paths(check)
            if as_json:
                json_out({"model": check, **found.to_dict()})
                return
            table = Table(title=f"Paths of {check} ({found.model_type})")
            table.add_column("part")
            table.add_column("path", overflow="fold")
            for part, what in (("training", "training forward"), ("decoding", "generation, evaluation, serving"),
                               ("kernels", "C kernels (bf16)")):
                table.add_row(f"{part}: {what}", found.path(part))
            console.print(table)
            console.print("HONE_FAST=0 turns every fast path off (transformers' forward everywhere).")
            return

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
