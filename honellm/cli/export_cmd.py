"""`hone export`: export an artifact as a merged model, a standalone adapter (transformers, vLLM) or GGUF (llama.cpp,
Ollama, LM Studio)."""

from __future__ import annotations

import typer

from honellm.cli.common import echo


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        artifact: str = typer.Argument(..., help="an artifact folder (e.g. runs/sst2/lora-*/artifact)"),
        out_arg: str = typer.Argument(None, metavar="OUT", help="the folder to write (or --out)"),
        merged: str = typer.Option(None, "--merged", help="write a merged standalone model to this folder "
                                                          "(the same as --format merged --out FOLDER)"),
        out: str = typer.Option(None, "--out", "-o", help="the folder to write"),
        format: str = typer.Option("merged", "--format", help="merged: a standalone transformers model folder; "
                                                               "adapter: a PEFT adapter folder (vLLM --enable-lora); "
                                                               "gguf: GGUF files + an Ollama Modelfile"),
        quant: list[str] = typer.Option(None, "--quant", help="GGUF quantisation, repeatable: f16, q8_0 (default), "
                                                              "bf16, f32, q6_k, q5_k_m, q5_k_s, q4_k_m (Ollama's "
                                                              "default), q4_k_s, q5_1, q5_0, q4_1, q4_0"),
        dtype: str = typer.Option("auto", "--dtype", help="merged weights' dtype: auto (the base's), bf16 or fp32"),
        force: bool = typer.Option(False, "--force", help="replace an existing folder"),
    ):
        """Export an artifact for use without Hone: a merged model folder, its adapter, or GGUF for llama.cpp/Ollama."""
        from honellm.errors import HoneError
        from honellm.export import export_artifact

        given = [x for x in (merged, out, out_arg) if x]
        if len(given) > 1:
            raise HoneError("give the folder once: --merged FOLDER, --out FOLDER or OUT", fix="drop all but one")
        if merged and format != "merged":
            raise HoneError("--merged writes the merged format", fix="drop --format, or use --out with --format adapter")
        if quant and format != "gguf":
            raise HoneError("--quant is for --format gguf", fix="add --format gguf, or drop --quant")
        if not given:
            raise HoneError("no output folder", fix="pass --merged FOLDER, or --format adapter|gguf --out FOLDER")
        if format == "gguf":
            from honellm.export_gguf import check_quants

            check_quants(quant or [])  # before the merge, so a wrong name fails at once
        path = export_artifact(artifact, given[0], format="merged" if merged else format, force=force, dtype=dtype,
                               quants=quant or ["q8_0"])
        import json

        info = json.loads((path / "hone-export.json").read_text())
        echo(f"exported {format if not merged else 'merged'} model to {path}")
        for q, file in info.get("files", {}).items():
            echo(f"  {file['file']}: {file['bytes'] / 2**20:.1f} MiB ({q})")
        for note in info.get("notes", []):
            echo(f"note: {note}")
