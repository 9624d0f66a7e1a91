"""`hone tune`: train extra parameters (LoRA, DoRA, IA3, prompt tuning, ... full fine-tuning) -> Artifact."""

from __future__ import annotations

import typer

from honellm.cli.common import OverridesArg, json_out, print_methods, print_training_summary, run_or_search


def register(app: typer.Typer) -> None:
    @app.command("tune")
    def tune_command(
        task: str = typer.Argument(None, help="a task YAML or a built-in task name", show_default=False),
        overrides: list[str] = OverridesArg,
        method: str = typer.Option(None, "--method", "-m", help="tuning method (hone tune --methods lists them)"),
        config: str = typer.Option(None, "--config", "-c", help="a YAML file of method settings (may name the method)"),
        out: str = typer.Option(None, "--out", "-o", help="run folder (default: runs/<task>/<method>-<time>/); "
                                                          "the artifact goes into its artifact/ folder"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in --out (or the latest run of this "
                                                            "task and method) from its last checkpoint"),
        force: bool = typer.Option(False, "--force", help="replace an existing run folder"),
        skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip records that fail validation (they are "
                                                                        "counted and listed) instead of stopping"),
        list_methods: bool = typer.Option(False, "--methods", help="list the tuning methods and their settings, then exit"),
        as_json: bool = typer.Option(False, "--json", help="print the artifact's description as JSON"),
        search: int = typer.Option(0, "--search", help="search the method's settings with N trials on validation "
                                                       "(Optuna; docs/search.md) and keep the best"),
    ):
        """Fine-tune the task's model with a tuning method; write an Artifact (adapter or weights + prompt program).

        Settings are key=value overrides: method and training settings (r=8 lr=1e-4 epochs=2 batch_size=4
        eval_every=50 early_stopping_patience=3 precision=fp32 ...) or task fields (data.train=... model=...).
        Runs under `accelerate launch` or `torchrun` for several processes (DDP) with the same command.
        """
        if list_methods:
            print_methods("tuning", as_json)
            return
        if task is None:
            raise typer.BadParameter("give a task YAML or a built-in task name", param_hint="TASK")
        artifact = run_or_search(task, method, overrides or [], family="tuning", search=search, config_file=config,
                                 out=out, resume=resume, force=force, skip_invalid=skip_invalid)
        from honellm.training.setup import is_main_process

        if not is_main_process():
            return
        if as_json:
            json_out(artifact.describe())
            return
        print_training_summary(artifact)
