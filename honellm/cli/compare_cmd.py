"""`hone compare`: run several methods on the same task and budget and print a leaderboard."""

from __future__ import annotations

import re

import typer

from honellm.cli.common import OverridesArg, echo, json_out
from honellm.errors import HoneError


def parse_budget(text: str | None) -> float | None:
    """`20m`, `90s`, `1.5h`, `1h30m` or a plain number of seconds -> seconds."""
    if text is None or text in ("", "none"):
        return None
    units = {"s": 1, "m": 60, "min": 60, "h": 3600}
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(min|h|m|s)", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != text.replace(" ", ""):
        raise HoneError(f"cannot read the budget {text!r}", where="--budget",
                        fix="give a time such as 90s, 20m, 1.5h or 1h30m (or seconds as a number)")
    return sum(float(n) * units[u] for n, u in parts)


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    """`--set lora:r=16 --set dpo:beta=0.2` -> {"lora": ["r=16"], "dpo": ["beta=0.2"]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        method, sep, setting = item.partition(":")
        if not sep or "=" not in setting:
            raise HoneError(f"cannot read --set {item!r}", where="--set",
                            fix="write METHOD:KEY=VALUE, e.g. --set lora:r=16 or --set grpo:max_steps=20")
        out.setdefault(method, []).append(setting)
    return out


def print_leaderboard(run) -> None:
    from honellm.compare.results import summary_text

    echo(summary_text(run))


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_command(
        task: str = typer.Argument(..., help="a task YAML or a built-in task name"),
        overrides: list[str] = OverridesArg,
        methods: str = typer.Option(None, "--methods", "-m",
                                    help="comma-separated methods (default: zero-shot,few-shot,prompt-search,lora,"
                                         "dora,ia3,dpo,grpo); those the task's data cannot support are skipped. "
                                         "Compositions too: sft-then-dpo, grpo-from-sft, rft-from-best-of-n, "
                                         "lora+prompt-search, merge-ties (docs/search.md)"),
        budget: str = typer.Option(None, "--budget", "-b",
                                   help="wall-clock training or search time per method (20m, 90s, 1h)"),
        split: str = typer.Option(None, "--split", help="the split every method is judged on (default: test; a "
                                                        "task without one gets a test split held out from train)"),
        limit: int = typer.Option(None, "--limit", help="judge on the first N examples of the split"),
        sets: list[str] = typer.Option([], "--set", help="a method's setting, METHOD:KEY=VALUE (repeatable)"),
        out: str = typer.Option(None, "--out", "-o", help="compare folder (default: runs/<task>/compare-<time>/)"),
        resume: bool = typer.Option(False, "--resume", help="reuse the methods a previous run in --out (or the "
                                                            "latest compare of this task) finished"),
        force: bool = typer.Option(False, "--force", help="replace an existing --out folder"),
        report: bool = typer.Option(True, "--report/--no-report", help="write report.html in the compare folder"),
        as_json: bool = typer.Option(False, "--json", help="print compare.json's results as JSON"),
        search: int = typer.Option(0, "--search", help="search each method's settings in N trials on validation "
                                                       "within its budget first (docs/search.md)"),
        seeds: int = typer.Option(1, "--seeds", help="with --search: re-run each method's best settings with up to "
                                                     "N seeds in all (budget allowing); overlapping spreads tie"),
    ):
        """Run prompting, tuning and reward-based methods on one task, split and budget; print the leaderboard.

        Every method's Artifact is judged on the same split with the same evaluator; the leaderboard shows the
        metric with its 95% interval beside training time and tokens, trainable parameters, peak memory, and the
        prompt tokens and latency of one request at inference. Key=value arguments override task fields.
        """
        from honellm.compare.compare import compare

        names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        run = compare(task, names, overrides or [], budget_seconds=parse_budget(budget), split=split, limit=limit,
                      out=out, resume=resume, force=force, method_overrides=parse_sets(sets), search_trials=search,
                      seeds=seeds)
        report_path = None
        if report:
            from honellm.compare.report import write_report

            report_path = write_report(run.path)
        if as_json:
            json_out({"path": str(run.path), "report": str(report_path) if report_path else None,
                      "results": {k: v.to_dict() for k, v in run.results.items()},
                      "recommendation": run.recommendation})
            return
        print_leaderboard(run)
        echo(f"compare folder: {run.path}")
        if report_path:
            echo(f"report: {report_path}")
