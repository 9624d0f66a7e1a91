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


def print_training_summary(artifact, *, show_kind: bool = False) -> None:
    """What `hone tune` and `hone align` print about the artifact they made: parameters, speed, best validation."""
    cost, metrics = artifact.manifest.cost, artifact.manifest.metrics
    echo(f"artifact: {artifact.path}")
    echo(f"method: {artifact.manifest.method}{f' ({artifact.kind})' if show_kind else ''}   trainable parameters: "
         f"{cost['trainable_params']:,} of {cost['total_params']:,} "
         f"({100 * cost['trainable_params'] / cost['total_params']:.3g}%)")
    echo(f"trained {cost['train_steps']} steps, {cost['train_tokens']:,} tokens in {cost['train_seconds']:.1f} s: "
         f"{cost['tokens_per_second']:,.0f} tokens/s ({cost['precision']} on {cost['processes']} {cost['device']} "
         f"process{'es' if cost['processes'] > 1 else ''}); peak memory {cost['peak_memory_bytes'] / 2**30:.2f} GiB")
    scores = {k: v for k, v in metrics.items() if k.startswith("val_") and isinstance(v, (int, float))}
    if scores:
        echo(f"best validation (step {metrics.get('best_step')}): "
             + ", ".join(f"{k[4:]} {v:.4f}" for k, v in scores.items()))


def print_methods(family: str, as_json: bool) -> None:
    """`hone tune|align --methods`: the family's methods from the one registry, each with the settings it adds to
    (or changes from) the family's shared ones."""
    from honellm.methods.catalog import all_methods

    methods = all_methods(family)
    shared = next((m.shared for m in methods.values() if m.shared is not None), None)
    if shared is None:
        from honellm.training.config import TrainingConfig

        shared = TrainingConfig
    rows = []
    for method in methods.values():
        own = {name: field for name, field in method.config.model_fields.items()
               if name not in shared.model_fields or field.default != shared.model_fields[name].default}
        row = {"name": method.name, "summary": method.summary, "paper": method.paper}
        if method.details is not None:  # a tuning method: its adapter's properties
            row |= {"merges": method.details.merges, "gpu_only": method.details.needs_gpu}
        else:
            row["data"] = list(method.data)
        rows.append(row | {"settings": {name: {"default": field.default, "help": field.description}
                                        for name, field in own.items()}})
    if as_json:
        json_out(rows)
        return
    for row in rows:
        flags = ([] if row.get("merges", True) else ["does not merge"]) + (["CUDA only"] if row.get("gpu_only") else [])
        echo(f"{row['name']}: {row['summary']}"
             + (f" ({', '.join(flags)})" if flags else "")
             + (f" (data: {', '.join(row['data'])})" if row.get("data") else "")
             + (f"  {row['paper']}" if row["paper"] else ""))
        for name, setting in row["settings"].items():
            default = setting["default"]  # a multi-line default (a prompt template) on one line, quoted
            shown = repr(default) if isinstance(default, str) and "\n" in default else default
            echo(f"    {name}={shown}  {setting['help']}")
    echo("shared settings (every method): " + ", ".join(shared.model_fields))


def register_training_verb(app: typer.Typer, verb: str, *, family: str, doc: str, show_kind: bool = False) -> None:
    """Add `hone tune` or `hone align` (`family` "tuning" or "reward") to `app`: the same options, `doc` as its help.

    Lists the family's methods (`--methods`), or trains (or searches, `--search N`) and prints what the artifact is.
    """
    what = "tuning" if family == "tuning" else "align"

    def command(
        task: str = typer.Argument(None, help="a task YAML or a built-in task name", show_default=False),
        overrides: list[str] = OverridesArg,
        method: str = typer.Option(None, "--method", "-m", help=f"{what} method (hone {verb} --methods lists them)"),
        config: str = typer.Option(None, "--config", "-c", help="a YAML file of method settings (may name the method)"),
        out: str = typer.Option(None, "--out", "-o", help="run folder (default: runs/<task>/<method>-<time>/); "
                                                          "the artifact goes into its artifact/ folder"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in --out (or the latest run of this "
                                                            "task and method) from its last checkpoint"),
        force: bool = typer.Option(False, "--force", help="replace an existing run folder"),
        skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip records that fail validation (they are "
                                                                        "counted and listed) instead of stopping"),
        list_methods: bool = typer.Option(False, "--methods",
                                          help=f"list the {what} methods and their settings, then exit"),
        as_json: bool = typer.Option(False, "--json", help="print the artifact's description as JSON"),
        search: int = typer.Option(0, "--search", help="search the method's settings with N trials on validation "
                                                       "(Optuna; docs/search.md) and keep the best"),
    ):
        if list_methods:
            print_methods(family, as_json)
            return
        if task is None:
            raise typer.BadParameter("give a task YAML or a built-in task name", param_hint="TASK")
        artifact = run_or_search(task, method, overrides or [], family=family, search=search, config_file=config,
                                 out=out, resume=resume, force=force, skip_invalid=skip_invalid)
        from honellm.training.setup import is_main_process

        if not is_main_process():
            return
        if as_json:
            json_out(artifact.describe())
            return
        print_training_summary(artifact, show_kind=show_kind)

    command.__doc__ = doc
    command.__name__ = f"{verb}_command"
    app.command(verb)(command)


def run_or_search(task: str, method: str | None, overrides: list[str], *, family: str, search: int = 0, **options):
    """What `hone tune` and `hone align` run: the method once (`honellm.methods.catalog.run_task`), or with
    `--search N` the best of N trials of its settings on validation (docs/search.md) -> the Artifact."""
    if search:
        from honellm.search.study import search_task

        found = search_task(task, method, overrides, n_trials=search, **options)
        return getattr(found, "artifact", found)  # a search returns its best trial's artifact
    from honellm.methods.catalog import run_task

    return run_task(task, method, overrides, family=family, **options)
