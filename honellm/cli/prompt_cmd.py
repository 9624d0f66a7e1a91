"""`hone prompt`: build a prompt program (zero/few-shot, example selection, calibration, search) -> Artifact."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from honellm.cli.common import OverridesArg, console, echo


def register(app: typer.Typer) -> None:
    @app.command("prompt")
    def prompt_command(
        task: str = typer.Argument(..., help="task YAML or built-in task name"),
        overrides: list[str] = OverridesArg,
        search: int = typer.Option(None, "--search", min=1, help="try N candidate programs (instructions, shots, "
                                                                "selectors, calibration) on validation; keep the best"),
        shots: int = typer.Option(0, "--shots", min=0, help="demonstrations per query (without --search)"),
        selector: str = typer.Option("balanced", "--selector",
                                     help="example selector: random, balanced, bm25, embedding, mmr"),
        per_query: bool = typer.Option(None, "--per-query/--fixed", show_default=False,
                                       help="select demonstrations for each query, or one fixed set for all "
                                            "(default: per query for bm25/embedding/mmr, fixed for random/balanced)"),
        calibrate: bool = typer.Option(False, "--calibrate", help="calibrate the label choices (tasks with choices)"),
        calibration: str = typer.Option("content_free", "--calibration",
                                        help="with --calibrate: content_free (Zhao et al. 2021: 'N/A', '', '[MASK]' "
                                             "inputs) or batch (Zhou et al. 2024: a sample of training inputs)"),
        model: str = typer.Option(None, "--model", help="base model (default: the task's)"),
        max_examples: int = typer.Option(100, "--max-examples", min=1,
                                         help="validation records scored per candidate (the first N)"),
        max_minutes: float = typer.Option(30.0, "--max-minutes", min=0.1, help="wall-time cap of the search"),
        propose: int = typer.Option(None, "--propose", min=0, help="instructions the model proposes itself "
                                                                   "(default: 3 when the task lists none)"),
        out: Path = typer.Option(None, "--out", help="artifact folder (default: runs/<task>/prompt-.../artifact)"),
        force: bool = typer.Option(False, "--force", help="replace an existing artifact folder"),
        seed: int = typer.Option(0, "--seed", help="seed of selection, search order and proposals"),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="sequences per forward pass"),
        report_to: str = typer.Option(None, "--report-to", help="experiment trackers beside metrics.jsonl: "
                                                                 "tensorboard, mlflow, wandb, trackio (comma-separated)"),
    ):
        """Build a prompt program (zero/few-shot, example selection, calibration, search) -> Artifact.

        Without --search: the task's instruction with --shots demonstrations picked by --selector, optionally
        calibrated, scored on validation. With --search N: tries N candidates on the validation split (never
        test), prints and saves the table of candidates, and keeps the best.
        """
        from honellm.config import validate
        from honellm.methods.catalog import get_method
        from honellm.prompting.methods import prompt_run

        # The options become the typed config of one registered prompting method.
        if search:
            name, settings = "prompt-search", {"candidates": search, "max_seconds": max_minutes * 60,
                                               "propose": propose}
        else:
            name = "few-shot" if shots > 0 else "zero-shot"
            settings = {"calibration": calibration if calibrate else None}
            if shots > 0:
                settings |= {"shots": shots, "selector": selector, "per_query": per_query}
        config = validate(get_method(name, "prompting").config,
                          settings | {"max_examples": max_examples, "seed": seed, "batch_size": batch_size},
                          source="the command line")
        made = prompt_run(task, config, overrides=overrides or [], model_name=model, out=out, force=force,
                          report_to=report_to)
        if made.search is not None:
            print_candidates(made.search)
            echo(f"candidates: {made.run_dir / 'candidates.csv'}  ({len(made.search.candidates)} rows, "
                 f"{made.search.seconds:.0f} s)")
        program = made.artifact.program
        echo(f"system: {program.system!r}")
        sel = program.selector
        echo(f"demonstrations: {len(program.demonstrations)} fixed" + (f"; selector {sel.name} k={sel.k} "
             f"{'per query' if sel.per_query else 'fixed'}" if sel else "") +
             (f"; calibrated ({program.calibration_method}) "
              + ", ".join(f"{k}={v:+.2f}" for k, v in program.calibration.items())
              if program.calibration else ""))
        if made.validation:
            v = made.validation
            limit = f" --limit {v['limit']}" if v.get("limit") else ""
            echo(f"validation {v['metric']}: {v['score']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] n={v['n']}")
            echo(f"wrote {made.path}   (reproduce: hone eval {made.path} --split validation{limit})")
        else:
            echo(f"wrote {made.path}   (the task has no validation split, so nothing was scored)")


def print_candidates(search) -> None:
    table = Table(title="Prompt candidates (validation)")
    for column in ("#", "instruction", "shots", "selector", "calibration", "score", "95% CI", "prompt tok/ex", "s"):
        table.add_column(column, justify="left" if column in ("instruction", "selector") else "right")
    for c in search.candidates:
        mark = " *" if c is search.best else ""
        selector = "-" if c.shots == 0 else f"{c.selector} ({'per query' if c.per_query else 'fixed'})"
        table.add_row(f"{c.id}{mark}", c.instruction_id, str(c.shots), selector, c.calibration or "-",
                      f"{c.score:.3f}", f"[{c.ci95[0]:.2f}, {c.ci95[1]:.2f}]", f"{c.prompt_tokens_per_example:.0f}",
                      f"{c.seconds:.0f}")
    console.print(table)
