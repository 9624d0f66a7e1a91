"""`hone export`: export an artifact as a merged model or a standalone adapter for transformers and vLLM."""

from __future__ import annotations

import typer

from honellm.cli.common import echo


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        artifact: str = typer.Argument(..., help="an artifact folder (e.g. runs/sst2/lora-*/artifact)"),
        merged: str = typer.Option(None, "--merged", help="write a merged standalone model to this folder "
                                                          "(the same as --format merged --out FOLDER)"),
        out: str = typer.Option(None, "--out", "-o", help="the folder to write"),
        format: str = typer.Option("merged", "--format", help="merged: a standalone transformers model folder; "
                                                               "adapter: a PEFT adapter folder (vLLM --enable-lora)"),
        dtype: str = typer.Option("auto", "--dtype", help="merged weights' dtype: auto (the base's), bf16 or fp32"),
        force: bool = typer.Option(False, "--force", help="replace an existing folder"),
    ):
        """Export an artifact for use without Hone: a merged model folder, or its adapter."""
        from honellm.errors import HoneError
        from honellm.export import export_artifact

        if merged and out:
            raise HoneError("give the folder once: --merged FOLDER or --out FOLDER", fix="drop one of them")
        if merged and format != "merged":
            raise HoneError("--merged writes the merged format", fix="drop --format, or use --out with --format adapter")
        target = merged or out
        if not target:
            raise HoneError("no output folder", fix="pass --merged FOLDER, or --format adapter --out FOLDER")
        path = export_artifact(artifact, target, format="merged" if merged else format, force=force, dtype=dtype)
        import json

        notes = json.loads((path / "hone-export.json").read_text()).get("notes", [])
        echo(f"exported {format if not merged else 'merged'} model to {path}")
        for note in notes:
            echo(f"note: {note}")
