"""`hone align`: reward-based training (reward model, DPO/IPO/cDPO/KTO/ORPO/SimPO, online RL) -> Artifact.

The methods are the reward family of the one registry (`honellm.methods`); this module only parses and calls
`run_task`.
"""

from __future__ import annotations

import typer

from honellm.cli.common import OverridesArg, json_out, print_methods, print_training_summary, run_or_search


def register(app: typer.Typer) -> None:
    @app.command("align")
    def align_command(
        task: str = typer.Argument(None, help="a task YAML or a built-in task name", show_default=False),
        overrides: list[str] = OverridesArg,
        method: str = typer.Option(None, "--method", "-m", help="align method (hone align --methods lists them)"),
        config: str = typer.Option(None, "--config", "-c", help="a YAML file of method settings (may name the method)"),
        out: str = typer.Option(None, "--out", "-o", help="run folder (default: runs/<task>/<method>-<time>/); "
                                                          "the artifact goes into its artifact/ folder"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in --out (or the latest run of this "
                                                            "task and method) from its last checkpoint"),
        force: bool = typer.Option(False, "--force", help="replace an existing run folder"),
        skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip records that fail validation (they are "
                                                                        "counted and listed) instead of stopping"),
        list_methods: bool = typer.Option(False, "--methods", help="list the align methods and their settings, then exit"),
        as_json: bool = typer.Option(False, "--json", help="print the artifact's description as JSON"),
        search: int = typer.Option(0, "--search", help="search the method's settings with N trials on validation "
                                                       "(Optuna; docs/search.md) and keep the best"),
    ):
        """Train with rewards or preferences: a reward model, DPO and its family, online RL -> Artifact.

        Settings are key=value overrides: method and training settings (beta=0.1 lr=5e-5 max_steps=200
        batch_size=4 max_length=512 r=16 eval_every=50 ...) or task fields (data.train=... model=...).
        Runs under `accelerate launch` or `torchrun` for several processes (DDP) with the same command.
        """
        if list_methods:
            print_methods("reward", as_json)
            return
        if task is None:
            raise typer.BadParameter("give a task YAML or a built-in task name", param_hint="TASK")
        artifact = run_or_search(task, method, overrides or [], family="reward", search=search, config_file=config,
                                 out=out, resume=resume, force=force, skip_invalid=skip_invalid)
        from honellm.training.setup import is_main_process

        if not is_main_process():
            return
        if as_json:
            json_out(artifact.describe())
            return
        print_training_summary(artifact, show_kind=True)
