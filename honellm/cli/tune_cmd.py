"""`hone tune`: train extra parameters (LoRA, DoRA, IA3, prompt tuning, ... full fine-tuning) -> Artifact."""

from __future__ import annotations

import typer

from honellm.cli.common import OverridesArg, echo, json_out


def _methods_help() -> str:
    from honellm.tuning import all_methods

    return ", ".join(all_methods())


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
            _print_methods(as_json)
            return
        if task is None:
            raise typer.BadParameter("give a task YAML or a built-in task name", param_hint="TASK")
        from honellm.tuning import tune_task

        if search:  # docs/search.md
            from honellm.search.study import search_task as tune_task
        artifact = tune_task(task, method, overrides or [], config_file=config, out=out, resume=resume, force=force,
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
    echo(f"method: {artifact.manifest.method}   trainable parameters: {cost['trainable_params']:,} of "
         f"{cost['total_params']:,} ({100 * cost['trainable_params'] / cost['total_params']:.3g}%)")
    echo(f"trained {cost['train_steps']} steps, {cost['train_tokens']:,} tokens in {cost['train_seconds']:.1f} s: "
         f"{cost['tokens_per_second']:,.0f} tokens/s ({cost['precision']} on {cost['processes']} {cost['device']} "
         f"process{'es' if cost['processes'] > 1 else ''}); peak memory {cost['peak_memory_bytes'] / 2**30:.2f} GiB")
    scores = {k: v for k, v in metrics.items() if k.startswith("val_")}
    if scores:
        echo(f"best validation (step {metrics.get('best_step')}): "
             + ", ".join(f"{k[4:]} {v:.4f}" for k, v in scores.items()))


def _print_methods(as_json: bool) -> None:
    from honellm.tuning import all_methods
    from honellm.tuning.config import SFTConfig

    rows = []
    for method in all_methods().values():
        own = {name: field for name, field in method.config.model_fields.items()
               if name not in SFTConfig.model_fields or field.default != SFTConfig.model_fields[name].default}
        rows.append({"name": method.name, "summary": method.summary, "paper": method.paper, "merges": method.merges,
                     "gpu_only": method.needs_gpu,
                     "settings": {name: {"default": field.default, "help": field.description} for name, field in own.items()}})
    if as_json:
        json_out(rows)
        return
    for row in rows:
        flags = [] if row["merges"] else ["does not merge"]
        flags += ["CUDA only"] if row["gpu_only"] else []
        echo(f"{row['name']}: {row['summary']}" + (f" ({', '.join(flags)})" if flags else "")
             + (f"  {row['paper']}" if row["paper"] else ""))
        for name, setting in row["settings"].items():
            echo(f"    {name}={setting['default']}  {setting['help']}")
    echo("shared settings (every method): " + ", ".join(SFTConfig.model_fields))
