"""`hone report RUN_DIR`: one self-contained HTML file (figures embedded as PNG or inline SVG) for a compare run.

Sections: the recommendation with its reasons; the leaderboard (with each method's seeds where it ran several);
quality against cost with the Pareto front; learning curves from each method's metrics.jsonl; where methods
searched their settings (`compare --search`), the validation score of every trial against each searched
setting (inline SVG); the reward-hacking guard's panels where online RL ran; examples where the methods disagree.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

from honellm.atomic import atomic_write_text
from honellm.compare.results import SEED_COLUMNS, CompareRun, MethodResult, has_seeds, seed_cells, tied_note
from honellm.runs import read_metrics

GUARD_KEYS = ("proxy", "gold", "kl", "mean_length", "distinct_n", "entropy")
CURVE_KEYS = ("loss", "val_loss", "reward")  # and every other val_<metric> a recipe logs (val_accuracy, ...)
MAX_CURVE_PANELS = 4


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when cost (x) is minimised and quality (y) maximised."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _svg(fig) -> str:
    """The figure as an inline <svg> element (text kept as text; no network, no external file)."""
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def quality_cost_figure(results: list[MethodResult]) -> str | None:
    done = [r for r in results if r.done]
    if not done:
        return None
    plt = _plt()
    axes_spec = [("train_seconds", "training time (s)"), ("latency_ms", "latency per request (ms)")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, label) in zip(axes, axes_spec, strict=True):
        rows = [r for r in done if getattr(r, key) is not None]
        points = [(max(float(getattr(r, key)), 1e-3), r.score) for r in rows]
        front = set(pareto_front(points))
        for i, (r, (x, y)) in enumerate(zip(rows, points, strict=True)):
            color = {"prompting": "#1f77b4", "tuning": "#2ca02c", "reward": "#d62728"}.get(r.family, "gray")
            ax.scatter([x], [y], s=70 if i in front else 40, color=color, edgecolor="black" if i in front else "none",
                       zorder=3)
            if r.ci_low is not None and r.ci_high is not None:
                ax.plot([x, x], [r.ci_low, r.ci_high], color=color, alpha=0.4, zorder=2)
            ax.annotate(r.method, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ordered = sorted((points[i] for i in front), key=lambda p: p[0])
        if len(ordered) > 1:
            ax.step([p[0] for p in ordered], [p[1] for p in ordered], where="post", color="black", alpha=0.5,
                    linestyle="--", label="Pareto front")
            ax.legend(loc="lower right", fontsize=8)
        if key == "train_seconds" and points and max(p[0] for p in points) / max(min(p[0] for p in points), 1e-3) > 50:
            ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel(label)
        ax.set_ylabel(done[0].metric or "score")
        ax.grid(alpha=0.3)
    fig.suptitle("Quality against cost (blue: prompting, green: tuning, red: reward-based; outlined: Pareto front)",
                 fontsize=10)
    return _png(fig)


def method_metrics(r: MethodResult) -> list[dict]:
    """The metrics.jsonl rows of the run that made a row's artifact: the method's folder in the compare run, or,
    where that holds none (a searched method, a composition), the run folder its artifact was saved in (the best
    trial's, the composition's last part's)."""
    for folder in (r.run_dir, str(Path(r.artifact).parent) if r.artifact else None):
        if folder and (Path(folder) / "metrics.jsonl").exists():
            return read_metrics(Path(folder) / "metrics.jsonl")
    return []


def learning_curves_figure(results: list[MethodResult]) -> str | None:
    series = {}
    for r in results:
        rows = [m for m in method_metrics(r) if m.get("kind", "train") in ("train", "eval")]
        scores = sorted({k for m in rows for k in m if k.startswith("val_") and k not in CURVE_KEYS})
        for key in (*CURVE_KEYS, *scores):
            points = [(m["step"], m[key]) for m in rows if "step" in m and isinstance(m.get(key), (int, float))]
            if len(points) >= 2:
                series.setdefault(key, {})[r.method] = points
    if not series:
        return None
    series = dict(list(series.items())[:MAX_CURVE_PANELS])
    plt = _plt()
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 3.8), squeeze=False)
    for ax, (key, by_method) in zip(axes[0], series.items(), strict=True):
        for method, points in by_method.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=method, marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Learning curves (metrics.jsonl)", fontsize=10)
    return _png(fig)


def search_trials(run_dir: str | Path) -> tuple[list[dict], list[dict], int | None]:
    """A method's settings search in a compare folder (`<method>/search/`): its trials (the last `event: trial`
    line of each), the searched space (from its config.yaml; empty when unknown) and the best trial's number."""
    import yaml

    folder = Path(run_dir) / "search"
    rows = read_metrics(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []
    trials = {r["trial"]: r for r in rows if r.get("event") == "trial" and isinstance(r.get("params"), dict)}
    config = folder / "config.yaml"
    space = (yaml.safe_load(config.read_text()) or {}).get("space") or [] if config.exists() else []
    best = folder / "best.json"
    best_trial = json.loads(best.read_text()).get("best_trial") if best.exists() else None
    return [trials[k] for k in sorted(trials)], space, best_trial


def search_figures(results: list[MethodResult]) -> list[tuple[str, str, str]]:
    """(method, inline SVG, caption) for every method that searched its settings: one small chart per searched
    setting, the validation score of each trial against that setting's value (the best trial ringed, pruned
    trials as crosses along the bottom: they were stopped before they had a final score)."""
    out = []
    for r in results:
        if not r.run_dir:
            continue
        trials, space, best_trial = search_trials(r.run_dir)
        trials = [t for t in trials if t.get("state") in ("complete", "pruned")]
        names = [p["name"] for p in space] or sorted({k for t in trials for k in t["params"]})
        if not trials or not names:
            continue
        kinds = {p["name"]: p for p in space}
        scored = [t["score"] for t in trials if isinstance(t.get("score"), (int, float))]
        floor = min(scored) if scored else 0.0
        plt = _plt()
        fig, axes = plt.subplots(1, len(names), figsize=(2.9 * len(names), 2.5), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            spec = kinds.get(name, {})
            values = [t["params"].get(name) for t in trials]
            categorical = spec.get("type") == "choice" or any(not isinstance(v, (int, float)) for v in values)
            if categorical:
                order = list(spec.get("choices") or sorted({str(v) for v in values}))
                for v in values:  # a value outside the listed choices (given by hand) gets a place too
                    if not any(_same(c, v) for c in order):
                        order.append(v)
                xs = [next(i for i, c in enumerate(order) if _same(c, v)) for v in values]
                ax.set_xticks(range(len(order)), [str(c) for c in order], fontsize=7)
                ax.set_xlim(-0.5, len(order) - 0.5)
            else:
                xs = [float(v) if v is not None else float("nan") for v in values]
                if spec.get("log") and all(x > 0 for x in xs):
                    _log_axis(ax, xs)
            ax.yaxis.get_major_formatter().set_useOffset(False)
            for t, x in zip(trials, xs, strict=True):
                if t.get("state") == "pruned" or not isinstance(t.get("score"), (int, float)):
                    ax.scatter([x], [floor], marker="x", color="gray", s=25, zorder=2)
                else:
                    best = t["trial"] == best_trial
                    ax.scatter([x], [t["score"]], color="#2ca02c" if best else "#1f77b4", s=45 if best else 25,
                               edgecolor="black" if best else "none", zorder=3)
            ax.set_title(name, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"validation {r.metric or 'score'}", fontsize=8)
        complete = sum(t.get("state") == "complete" for t in trials)
        caption = (f"{r.method}: {len(trials)} trials ({complete} complete, {len(trials) - complete} pruned); "
                   f"green ringed: the best trial" + (f" (trial {best_trial})" if best_trial is not None else "")
                   + "; grey crosses: pruned trials")
        out.append((r.method, _svg(fig), caption))
    return out


def _same(choice, value) -> bool:
    """A searched value is one of the listed choices (3.0 is the choice 3: defaults may come back as floats)."""
    return choice == value or str(choice) == str(value)


def _log_axis(ax, xs: list[float]) -> None:
    """A log x axis with a few readable labels: the decades in range, or the ends when it spans less."""
    import math

    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    low, high = min(xs), max(xs)
    decades = [10.0 ** e for e in range(math.ceil(math.log10(low)), math.floor(math.log10(high)) + 1)]
    ticks = decades if len(decades) >= 2 else ([low, high] if high > low else [low])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(ticks, [f"{t:.0e}" if t in decades else f"{t:.1e}" for t in ticks])
    if high > low:
        pad = (high / low) ** 0.08
        ax.set_xlim(low / pad, high * pad)


def guard_figures(results: list[MethodResult]) -> list[tuple[str, str, list[dict], int | None]]:
    """(method, figure, alarms, kept step) for every method whose metrics.jsonl has reward-hacking guard records."""
    out = []
    for r in results:
        rows = method_metrics(r)
        guard = [m for m in rows if m.get("kind") == "guard"]
        if not guard:
            continue
        alarms = [m for m in rows if m.get("kind") == "alarm"]
        plt = _plt()
        keys = [k for k in GUARD_KEYS if any(isinstance(m.get(k), (int, float)) for m in guard)]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            points = [(m["step"], m[key]) for m in guard if isinstance(m.get(key), (int, float))]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
            for alarm in alarms:
                ax.axvline(alarm.get("step", 0), color="red", alpha=0.5, linestyle=":")
            ax.set_title(key, fontsize=9)
            ax.grid(alpha=0.3)
        kept = next((m.get("best_step") for m in reversed(rows) if m.get("kind") == "guard_summary"), None)
        title = f"{r.method}: reward-hacking guard" + (f" (kept checkpoint: step {kept})" if kept is not None else "")
        fig.suptitle(title + " — red lines: alarms", fontsize=10)
        out.append((r.method, _png(fig), alarms, kept))
    return out


def disagreements(results: list[MethodResult], limit: int = 12) -> tuple[list[str], list[dict]]:
    """Examples (by index in the evaluated split) where the methods' predictions disagree in correctness."""
    per_method = {}
    for r in results:
        if r.done and r.eval_path and Path(r.eval_path).exists():
            data = json.loads(Path(r.eval_path).read_text())
            per_method[r.method] = data.get("records", data.get("examples", []))
    if len(per_method) < 2:
        return [], []
    methods = list(per_method)
    n = min(len(v) for v in per_method.values())
    rows = []
    for i in range(n):
        scores = [per_method[m][i].get("score") for m in methods]
        if len({s for s in scores if s is not None}) > 1:
            first = per_method[methods[0]][i]
            text = str(first.get("query") or first.get("input") or first.get("prompt") or "")
            # the prompt as the model saw it ends with the query (demonstrations and system text come before it)
            rows.append({"input": text if len(text) <= 400 else "…" + text[-400:], "reference": first.get("reference"),
                         "predictions": {m: (per_method[m][i].get("prediction"), per_method[m][i].get("score"))
                                         for m in methods}})
        if len(rows) >= limit:
            break
    return methods, rows


def _table(results: list[MethodResult], tied: list[str] | None = None) -> str:
    """The leaderboard; with the seed columns where some method ran several seeds; methods tied with the best
    (the recommendation's `tied`) marked."""
    seeds = has_seeds(results)
    head = ("method", "family", "score", "95% CI", *(SEED_COLUMNS if seeds else ()), "n", "train time",
            "train tokens", "trainable params", "peak memory", "prompt tokens/req", "latency/req", "status")
    lines = ["<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in results:
        if r.done:
            cells = [r.method, r.family, f"{r.score:.3f}", f"[{r.ci_low:.3f}, {r.ci_high:.3f}]" if r.ci_low is not None else "-",
                     *(seed_cells(r) if seeds else ()), str(r.n),
                     f"{r.train_seconds:.0f} s", f"{r.train_tokens:,}", f"{r.trainable_params:,}",
                     f"{r.peak_memory_mb:.0f} MB" if r.peak_memory_mb else "-",
                     f"{r.prompt_tokens:.0f}" if r.prompt_tokens is not None else "-",
                     f"{r.latency_ms:.0f} ms" if r.latency_ms is not None else "-",
                     "done, tied with the best" if tied and len(tied) > 1 and r.method in tied else "done"]
        else:
            cells = [r.method, r.family] + ["-"] * (len(head) - 3) + [f"{r.status}: {r.reason or ''}"]
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;font-size:.85rem;width:100%} th,td{border:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f5f5f5} .meta{color:#666;font-size:.9rem} img{max-width:100%}
.rec{background:#eef7ee;border:1px solid #9c9;border-radius:6px;padding:.8rem 1rem} .rec b{font-size:1.1rem}
.svg svg{max-width:100%;height:auto} .ok{color:#2a7} .bad{color:#c33} .alarm{color:#c33;font-size:.85rem}
"""


def _head(title: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>")


FOOT = ("<p class='meta'>Written by Hone. Each method's run folder holds its config, metrics.jsonl, log and "
        "artifact.</p></body></html>")


def render_report(run: CompareRun) -> str:
    """One compare run as a self-contained HTML page (figures embedded as PNG data)."""
    name = str(run.task.get("name", ""))
    return "\n".join([_head(f"Hone report: {name}"), f"<h1>Hone report: {html.escape(name)}</h1>",
                      *render_sections(run), FOOT])


def render_combined(runs: list[CompareRun], title: str = "Hone demo", intro: str = "") -> str:
    """Several compare runs (one per task, as `hone demo` makes) in one page: a summary, then each run's sections."""
    parts = [_head(title), f"<h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p class='meta'>{html.escape(intro)}</p>")
    parts.append("<h2>Summary</h2><table><thead><tr><th>task</th><th>recommended</th><th>its score</th>"
                 "<th>zero-shot</th></tr></thead><tbody>")
    for run in runs:
        rec = run.recommendation or {}
        best = run.results.get(rec.get("method", ""))
        base = run.results.get("zero-shot")
        parts.append(f"<tr><td><a href='#{html.escape(str(run.task.get('name')))}'>"
                     f"{html.escape(str(run.task.get('name')))}</a></td><td>{html.escape(rec.get('method', '-'))}</td>"
                     f"<td>{f'{best.score:.3f}' if best and best.done else '-'}</td>"
                     f"<td>{f'{base.score:.3f}' if base and base.done else '-'}</td></tr>")
    parts.append("</tbody></table>")
    for run in runs:
        name = str(run.task.get("name", ""))
        parts.append(f"<h1 id='{html.escape(name)}' style='margin-top:3rem'>Task: {html.escape(name)}</h1>")
        parts.extend(render_sections(run))
    parts.append(FOOT)
    return "\n".join(parts)


def render_sections(run: CompareRun) -> list[str]:
    """The body of one run's report: recommendation, leaderboard, figures, guard panels, disagreements."""
    results = run.ordered()
    task = run.task
    budget = f"{run.budget_seconds:.0f} s" if run.budget_seconds else "none"
    limit = f" · limit: {run.limit} examples" if run.limit else ""
    held = task.get("held_out")
    held_text = f" (held out from {held['from']}: {held['records']} records, seed {held['seed']})" if held else ""
    parts = [f"<p class='meta'>split: {run.split}{held_text} · metric: {html.escape(str(task.get('metric')))} · model: "
             f"{html.escape(str(task.get('model')))} · budget per method: "
             f"{budget}{limit} · written {time.strftime('%Y-%m-%d %H:%M')}</p>"]
    rec = run.recommendation
    parts.append("<h2>Recommendation</h2>")
    if rec:
        reasons = "".join(f"<li>{html.escape(x)}</li>" for x in rec["reasons"])
        parts.append(f"<div class='rec'><b>Use {html.escape(rec['method'])}</b> ({html.escape(rec['family'])})"
                     f"<ul>{reasons}</ul></div>")
    else:
        parts.append("<p>No method finished, so there is nothing to recommend.</p>")
    parts.append("<h2>Leaderboard</h2>")
    parts.append(_table(results, (rec or {}).get("tied")))
    note = tied_note(run)
    if note:
        parts.append(f"<p class='meta'>{html.escape(note)}; the recommendation picks the cheapest of them.</p>")
    figure = quality_cost_figure(results)
    if figure:
        parts.append("<h2>Quality against cost</h2>")
        parts.append(f"<img alt='quality against cost' src='{figure}'>")
    curves = learning_curves_figure(results)
    if curves:
        parts.append("<h2>Learning curves</h2>")
        parts.append(f"<img alt='learning curves' src='{curves}'>")
    searches = search_figures(results)
    if searches:
        parts.append("<h2>Settings searched: validation score against each setting</h2>")
        for method, svg, caption in searches:
            parts.append(f"<h3>{html.escape(method)}</h3><div class='svg'>{svg}</div>"
                         f"<p class='meta'>{html.escape(caption)}</p>")
    guards = guard_figures(results)
    if guards:
        parts.append("<h2>Reward-hacking guard</h2>")
        for method, fig, alarms, kept in guards:
            parts.append(f"<h3>{html.escape(method)}</h3><img alt='guard {html.escape(method)}' src='{fig}'>")
            if kept is not None:
                parts.append(f"<p>kept checkpoint: step {kept} (best by the gold signal)</p>")
            for a in alarms:
                parts.append(f"<p class='alarm'>step {a.get('step')}: {html.escape(str(a.get('alarm')))} — "
                             f"{html.escape(str(a.get('message', '')))}</p>")
    methods, rows = disagreements(results)
    if rows:
        parts.append("<h2>Where the methods disagree</h2>")
        head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
        parts.append(f"<table><thead><tr><th>input</th><th>reference</th>{head}</tr></thead><tbody>")
        for row in rows:
            cells = []
            for m in methods:
                prediction, score = row["predictions"][m]
                cls = "ok" if score and score > 0 else "bad"
                cells.append(f"<td class='{cls}'>{html.escape(str(prediction))[:300]}</td>")
            parts.append(f"<tr><td>{html.escape(str(row['input']))}</td><td>{html.escape(str(row['reference']))[:200]}</td>"
                         + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
    return parts


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run = CompareRun.load(run_dir)
    path = Path(out) if out else run.path / "report.html"
    atomic_write_text(path, render_report(run))
    return path


def write_combined_report(run_dirs: list[str | Path], out: str | Path, *, title: str = "Hone demo",
                          intro: str = "") -> Path:
    """One HTML file for several compare runs (what `hone demo` writes)."""
    runs = [CompareRun.load(d) for d in run_dirs]
    path = Path(out)
    atomic_write_text(path, render_combined(runs, title, intro))
    return path
