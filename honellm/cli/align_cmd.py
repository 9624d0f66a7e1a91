"""`hone align`: reward-based training (reward model, DPO/IPO/cDPO/KTO/ORPO/SimPO, online RL) -> Artifact.

The methods come from the registry in `honellm.reward.recipes`; this module only parses and calls `align_task`.
"""

from __future__ import annotations

import typer

from honellm.cli.common import OverridesArg, echo, json_out


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
            _print_methods(as_json)
            return
        if task is None:
            raise typer.BadParameter("give a task YAML or a built-in task name", param_hint="TASK")
        from honellm.reward.recipes import align_task

        if search:  # docs/search.md
            from honellm.search.study import search_task as align_task
        artifact = align_task(task, method, overrides or [], config_file=config, out=out, resume=resume, force=force,
                              skip_invalid=skip_invalid, **({"n_trials": search} if search else {}))
        artifact = getattr(artifact, "artifact", artifact)  # a search returns its best trial's artifact
        from honellm.training.setup import is_main_process

        if not is_main_process():
            return
        if as_json:
            json_out(artifact.describe())
            return
        _print_summary(artifact)


def _print_summary(artifact) -> None:
    cost, metrics = artifact.manifest.cost, artifact.manifest.metrics
    echo(f"artifact: {artifact.path}")
    echo(f"method: {artifact.manifest.method} ({artifact.kind})   trainable parameters: {cost['trainable_params']:,} "
         f"of {cost['total_params']:,} ({100 * cost['trainable_params'] / cost['total_params']:.3g}%)")
    echo(f"trained {cost['train_steps']} steps, {cost['train_tokens']:,} tokens in {cost['train_seconds']:.1f} s: "
         f"{cost['tokens_per_second']:,.0f} tokens/s ({cost['precision']} on {cost['processes']} {cost['device']} "
         f"process{'es' if cost['processes'] > 1 else ''}); peak memory {cost['peak_memory_bytes'] / 2**30:.2f} GiB")
    scores = {k: v for k, v in metrics.items() if k.startswith("val_") and isinstance(v, (int, float))}
    if scores:
        echo(f"best validation (step {metrics.get('best_step')}): "
             + ", ".join(f"{k[4:]} {v:.4f}" for k, v in scores.items()))


def _print_methods(as_json: bool) -> None:
    from honellm.reward.recipes import all_align_methods
    from honellm.training.config import TrainingConfig

    rows = []
    for method in all_align_methods().values():
        own = {name: field for name, field in method.config.model_fields.items()
               if name not in TrainingConfig.model_fields or field.default != TrainingConfig.model_fields[name].default}
        rows.append({"name": method.name, "summary": method.summary, "paper": method.paper, "data": list(method.data),
                     "settings": {name: {"default": field.default, "help": field.description}
                                  for name, field in own.items()}})
    if as_json:
        json_out(rows)
        return
    for row in rows:
        echo(f"{row['name']}: {row['summary']} (data: {', '.join(row['data'])})"
             + (f"  {row['paper']}" if row["paper"] else ""))
        for name, setting in row["settings"].items():
            echo(f"    {name}={setting['default']}  {setting['help']}")
    echo("shared settings (every method): " + ", ".join(TrainingConfig.model_fields))
