"""Pick one method from a leaderboard, with reasons a person can check.

The rule (docs/playbook.md): take the best score; every method whose 95% interval reaches the best one's
score is statistically tied with it; among the tied, prefer the cheapest to run (prompt tokens and latency per
request), then the cheapest to make (training time), then the simplest family (prompting, then tuning, then
reward-based). A cheaper method within the noise of the best is the better buy.

Where methods were re-run with several seeds (`MethodResult.extra["seed_scores"]`, from
`honellm.search.seeds`), a method whose seed spread (min to max) overlaps the best one's is tied with it too:
the difference is within what a change of seed moves.
"""

from __future__ import annotations

from collections.abc import Sequence

from honellm.compare.results import FAMILIES, MethodResult

LATENCY_TOLERANCE = 0.15  # five timed requests: differences below ~15% are within the run-to-run spread


def _fmt(r: MethodResult) -> str:
    ci = f" [{r.ci_low:.3f}, {r.ci_high:.3f}]" if r.ci_low is not None and r.ci_high is not None else ""
    return f"{r.method} {r.score:.3f}{ci}"


def spreads_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two methods' seed spreads (the range of their scores across seeds) overlap: then they are tied."""
    if not a or not b:
        return False
    return min(a) <= max(b) and min(b) <= max(a)


def _seeds_tie(r: MethodResult, best: MethodResult) -> bool:
    mine, theirs = r.extra.get("seed_scores"), best.extra.get("seed_scores")
    return bool(mine and theirs and spreads_overlap(mine, theirs))


def tied_with_best(results: list[MethodResult]) -> tuple[MethodResult, list[MethodResult]]:
    done = [r for r in results if r.done]
    best = max(done, key=lambda r: r.score)
    tied = [r for r in done if r is best or (r.ci_high is not None and r.ci_high >= best.score)
            or _seeds_tie(r, best)]
    return best, tied


def _serve_cost(r: MethodResult) -> tuple[float, float]:
    return (r.latency_ms if r.latency_ms is not None else float("inf"),
            r.prompt_tokens if r.prompt_tokens is not None else float("inf"))


def recommend(results: list[MethodResult], *, baseline: str = "zero-shot") -> dict | None:
    """`{"method", "reasons": [...], "tied": [...]}` or None when nothing finished."""
    done = [r for r in results if r.done]
    if not done:
        return None
    best, tied = tied_with_best(done)
    fastest = min(_serve_cost(r)[0] for r in tied)

    def cost(r: MethodResult) -> tuple:
        latency, tokens = _serve_cost(r)
        # Latencies within LATENCY_TOLERANCE of the fastest are timing noise, not a difference in serving cost.
        return (0.0 if latency <= fastest * (1 + LATENCY_TOLERANCE) else latency, tokens, r.train_seconds,
                r.trainable_params, FAMILIES.index(r.family) if r.family in FAMILIES else 9)

    pick = min(tied, key=cost)
    reasons = [f"best score: {_fmt(best)} ({best.metric}, n={best.n})"]
    if pick is not best:
        why = (f"its 95% interval reaches {best.score:.3f}" if pick.ci_high is not None and pick.ci_high >= best.score
               else "their scores across seeds overlap")
        reasons.append(f"{pick.method} ({pick.score:.3f}) is statistically tied with {best.method}: {why}; it is "
                       f"cheaper (" + _cost_words(pick, best) + ")")
    else:
        others = [r for r in tied if r is not pick]
        if others:
            reasons.append("statistically tied but more expensive to serve or make: " + ", ".join(
                f"{r.method} ({_cost_words(r, pick, inverse=True)})" for r in others))
        else:
            reasons.append("no other method's 95% interval reaches it: the lead is beyond sampling noise")
    base = next((r for r in done if r.method == baseline), None)
    if base is not None and pick is not base:
        reasons.append(f"gain over {baseline}: {pick.score - base.score:+.3f} ({base.score:.3f} -> {pick.score:.3f})")
    if pick.prompt_tokens is not None and pick.latency_ms is not None:
        reasons.append(f"at inference: {pick.prompt_tokens:.0f} prompt tokens and {pick.latency_ms:.0f} ms per request")
    if pick.train_seconds:
        reasons.append(f"to make: {pick.train_seconds:.0f} s of training, {pick.trainable_params:,} trainable parameters")
    skipped = [r for r in results if r.status == "skipped"]
    if skipped:
        reasons.append("not run: " + "; ".join(f"{r.method} ({r.reason})" for r in skipped))
    return {"method": pick.method, "family": pick.family, "artifact": pick.artifact, "reasons": reasons,
            "tied": [r.method for r in tied]}


def _cost_words(a: MethodResult, b: MethodResult, inverse: bool = False) -> str:
    """How `a` compares with `b` in cost, in words."""
    parts = []
    if a.latency_ms is not None and b.latency_ms is not None and b.latency_ms > 0:
        parts.append(f"latency x{a.latency_ms / b.latency_ms:.2f}")
    if a.prompt_tokens is not None and b.prompt_tokens:
        parts.append(f"prompt tokens x{a.prompt_tokens / b.prompt_tokens:.2f}")
    if a.train_seconds or b.train_seconds:
        parts.append(f"training {a.train_seconds:.0f} s vs {b.train_seconds:.0f} s")
    return ", ".join(parts) or "same cost"
