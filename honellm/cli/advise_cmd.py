"""`hone advise TASK`: which methods to try, in which order, why, and what each will cost."""

from __future__ import annotations

import typer
from rich.table import Table

from honellm.cli.common import OverridesArg, console, echo, json_out


def parse_duration(text: str | None) -> float | None:
    """"90s", "20m", "1.5h" or a number of seconds."""
    if text is None:
        return None
    from honellm.errors import HoneError

    units = {"s": 1, "m": 60, "h": 3600}
    value = text.strip().lower()
    try:
        if value[-1] in units:
            return float(value[:-1]) * units[value[-1]]
        return float(value)
    except (ValueError, IndexError):
        raise HoneError(f"cannot read the duration {text!r}", fix="write e.g. 90s, 20m or 1.5h") from None


def register(app: typer.Typer) -> None:
    @app.command("advise")
    def advise_command(
        task: str = typer.Argument(..., help="task YAML or built-in task name"),
        overrides: list[str] = OverridesArg,
        budget: str = typer.Option(None, "--budget", help="training time per method, e.g. 20m"),
        max_latency_ms: float = typer.Option(None, "--max-latency-ms", help="serving latency budget per request"),
        memory_gb: float = typer.Option(None, "--memory-gb", help="memory available for training (default: this machine's)"),
        probe: bool = typer.Option(False, "--probe", help="measure the zero-shot score on 50 validation examples first"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
    ):
        """Recommend the order of methods to try for TASK, with the playbook's reasons and estimated costs."""
        from honellm.compare.advise import advise
        from honellm.task import Task

        t = Task.load(task, overrides or [])
        result = advise(t, budget_seconds=parse_duration(budget), max_latency_ms=max_latency_ms, memory_gb=memory_gb,
                        probe=probe)
        if as_json:
            json_out(result.to_dict())
            return
        f = result.facts
        echo(f"task {result.task}: {f['kind']} data ({f['format']}), splits {f['splits']}, metric {f['metric']}")
        echo(f"labels: {'choices' if f['has_choices'] else 'free text' if f['has_targets'] else 'none'}; "
             f"preference pairs: {'yes' if f['has_pairs'] else 'no'}; reward functions: {'yes' if f['has_rewards'] else 'no'}")
        echo(f"model: {f['model_parameters'] / 1e6:.0f}M parameters; hardware: {f['hardware'].get('device')}, "
             f"matmul {f['matmul_tflops']['auto']} TFLOP/s (fp32 {f['matmul_tflops']['fp32']}), memory {f['memory_gb']} GB")
        if result.probe:
            p = result.probe
            echo(f"probe: zero-shot {p['metric']} {p['zero_shot_score']:.3f} on {p['limit']} {p['split']} examples "
                 f"({p['seconds']} s)")
        table = Table(title="Try in this order (rules: docs/playbook.md)")
        for col in ("#", "method", "family", "rules", "why", "est. train", "est. memory", "prompt tokens/req"):
            table.add_column(col, overflow="fold")
        for i, s in enumerate(result.steps, 1):
            why = s.why + (f" [{s.note}]" if s.note else "")
            table.add_row(str(i), s.method, s.family, ",".join(s.rules), why,
                          f"{s.est_train_seconds:.0f} s" if s.est_train_seconds is not None else "-",
                          f"{s.est_memory_gb:.1f} GiB" if s.est_memory_gb is not None else "-",
                          f"{s.est_prompt_tokens:.0f}" if s.est_prompt_tokens is not None else "-")
        console.print(table)
        if result.best_bet:
            bet = result.best_bet
            echo(f"likely best: {bet['method']} ({','.join(bet['rules'])}): {bet['why']}")
        for method, reason in result.not_applicable:
            echo(f"not applicable: {method}: {reason}")
