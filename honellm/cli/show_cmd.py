"""`hone show ARTIFACT`: what an artifact is, how it was made, and its scores."""

from __future__ import annotations

import typer

from honellm.cli.common import console, echo, json_out


def register(app: typer.Typer) -> None:
    @app.command("show")
    def show(
        artifact: str = typer.Argument(..., help="an artifact folder"),
        as_json: bool = typer.Option(False, "--json", help="print the description as JSON"),
        no_verify: bool = typer.Option(False, "--no-verify", help="do not check the base model's hash"),
    ):
        """Describe an artifact: base model, method, prompt program, adapter, metrics and cost."""
        from honellm.artifact import Artifact

        art = Artifact.load(artifact, verify_base=not no_verify)
        info = art.describe()
        if as_json:
            json_out(info)
            return
        console.print(f"[bold]{info['name']}[/]  ({info['path']})")
        echo(f"method: {info['method']}   kind: {info['kind']}   task: {info['task']}   created: {info['created_at']}")
        echo(f"base model: {info['base_model']} ({info['base_hash']})" + ("" if no_verify else "  [hash verified]"))
        if art.adapter_dir:
            import json

            cfg = json.loads((art.adapter_dir / "adapter_config.json").read_text())
            echo(f"adapter: {cfg.get('peft_type')} r={cfg.get('r')} targets={cfg.get('target_modules')}")
        if art.weights_dir:
            echo(f"full weights: {art.weights_dir}")
        echo(f"system: {info['system']!r}")
        echo(f"template: {info['template']!r}")
        sel = info["selector"]
        echo(f"demonstrations: {info['demonstrations']} fixed" + (f"; selector {sel['name']} k={sel['k']}" if sel else "")
             + ("; calibrated" if info["calibrated"] else ""))
        if info["config"]:
            echo("config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items() if not isinstance(v, (dict, list))))
        for title in ("metrics", "cost"):
            if info[title]:
                echo(f"{title}:")
                for k, v in info[title].items():
                    echo(f"  {k}: {v}")
