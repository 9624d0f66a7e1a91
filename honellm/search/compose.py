"""Compositions of methods users otherwise wire by hand; each ends in one Artifact whose cost is the total.

- `sft_then_dpo(task, ...)`: supervised tuning on the task's answers (the chosen ones of preference pairs), its
  adapter folded into the base weights (kept in the composition's folder), then DPO from there: the SFT model is
  both the starting policy and DPO's reference, as in the DPO paper's recipe.
- `prompt_on_adapter(task, artifact, ...)`: the prompt search (instruction, demonstrations, calibration) run
  on the tuned model, so the prompt is chosen for the adapter (in the spirit of DSPy's BetterTogether); the
  artifact keeps the adapter and carries the program found.
- `merge_adapters(task, artifacts, combination=...)`: LoRA adapters combined by peft's `add_weighted_adapter`
  (linear, TIES, DARE-linear, DARE-TIES) into one adapter.

The cost in each manifest (`train_seconds`, `train_tokens`) adds up every part's, so a composition's row in a
comparison is charged for all the work it did; `cost["parts"]` lists the parts.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from honellm.artifact import Artifact
from honellm.errors import HoneError

COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties")


def total_cost(parts: dict[str, Artifact | dict], seconds: float = 0.0) -> dict:
    """Train seconds and tokens of all `parts` (artifacts, or cost dicts) plus `seconds` of the composition's own."""
    costs = {name: (p.manifest.cost if isinstance(p, Artifact) else p) or {} for name, p in parts.items()}
    return {"train_seconds": round(sum(float(c.get("train_seconds", 0.0)) for c in costs.values()) + seconds, 2),
            "train_tokens": int(sum(int(c.get("train_tokens", 0)) for c in costs.values())),
            "trainable_params": max((int(c.get("trainable_params", 0)) for c in costs.values()), default=0),
            "parts": {name: {k: c.get(k) for k in ("train_seconds", "train_tokens")} for name, c in costs.items()}}


def sft_then_dpo(task, *, sft_method: str = "lora", sft_overrides: list[str] | None = None,
                 dpo_method: str = "dpo", dpo_overrides: list[str] | None = None, out: str | Path,
                 force: bool = False) -> Artifact:
    """SFT (`sft_method`) on `task`'s answers, folded into the weights, then `dpo_method` from it -> Artifact."""
    from honellm.methods.catalog import method_config, run_method

    out = Path(out)
    spec, config = method_config(sft_method, None, sft_overrides or [], family="tuning")
    sft = run_method(task, spec, config, out=out / "sft", force=force)
    started = time.perf_counter()
    merged = out / "sft-merged"
    _fold_adapter(sft, merged)
    fold_seconds = time.perf_counter() - started
    from_sft = copy.copy(task)
    from_sft.config = task.config.model_copy(update={"model": str(merged.resolve())})
    spec, config = method_config(dpo_method, None, dpo_overrides or [], family="reward")
    dpo = run_method(from_sft, spec, config, out=out / "dpo", force=force)
    dpo.manifest.method = f"{sft.manifest.method}+{spec.name}"
    dpo.manifest.cost = {**(dpo.manifest.cost or {}), **total_cost({"sft": sft, spec.name: dpo}, fold_seconds)}
    dpo.update_manifest(method=dpo.manifest.method, cost=dpo.manifest.cost)
    return dpo


def _fold_adapter(artifact: Artifact, folder: Path) -> None:
    """The artifact's adapter merged into its base weights, saved as a model folder (fp32 merge)."""
    if artifact.adapter_dir is None:
        raise HoneError(f"a {artifact.kind} artifact has no adapter to fold into the weights", where=str(artifact.path))
    model, tokenizer = artifact.load_model(dtype="fp32", device="cpu")
    model = model.merge_and_unload()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def prompt_on_adapter(task, artifact: Artifact, *, candidates: int = 8, out: str | Path, max_examples: int = 100,
                      max_seconds: float = 1800.0, config=None, progress: bool = True) -> Artifact:
    """Search the prompt program for the tuned model `artifact` (validation only) -> its adapter + that program.

    `config`: a `PromptSearchConfig` setting every knob of the search (then `candidates`, `max_examples` and
    `max_seconds` are not used)."""
    from honellm.prompting.search import PromptSearchConfig, search_prompt, write_candidates
    from honellm.runs import RunDir

    if artifact.adapter_dir is None:
        raise HoneError("prompt_on_adapter needs an adapter artifact", where=str(artifact.path),
                        fix="pass the artifact of hone tune or hone align")
    out = Path(out)
    run = RunDir.create(task.name, "prompt-on-adapter", out=out, force=True)
    started = time.perf_counter()
    try:
        model, tokenizer = artifact.load_model()
        config = config or PromptSearchConfig(candidates=candidates, max_examples=max_examples,
                                              max_seconds=max_seconds)
        found = search_prompt(task, model, tokenizer, config, run=run, progress=progress)
        write_candidates(run.path / "candidates.csv", found.candidates)
    finally:
        run.close()
    seconds = time.perf_counter() - started
    best = found.best
    per_query = best.program.selector is not None and best.program.selector.per_query
    combined = Artifact.create(
        name=f"{task.name}-{artifact.manifest.method}+prompt", method=f"{artifact.manifest.method}+prompt-search",
        kind="adapter", base_model=artifact.base_model, program=best.program, task=task,
        config={"adapter_from": str(artifact.path), **(artifact.manifest.config or {})},
        metrics={"validation": {"score": best.score, "ci95": list(best.ci95), "n": best.n}},
        cost=total_cost({"adapter": artifact}, seconds), run_dir=str(run.path))
    combined.save(out / "artifact", force=True, extra_files={"adapter": artifact.adapter_dir},
                  pool=[dict(r) for r in found.pool] if per_query and found.pool else None)
    return Artifact.load(out / "artifact", verify_base=False)


def merge_adapters(task, artifacts: list[Artifact], *, combination: str = "linear", weights: list[float] | None = None,
                   density: float = 0.5, out: str | Path) -> Artifact:
    """One adapter from several LoRA adapters of the same base (peft's `add_weighted_adapter`) -> Artifact.

    `combination`: linear, ties, dare_linear or dare_ties; `density`: the share of weights TIES/DARE keep;
    `weights`: one per adapter (default equal). The program is the first artifact's.
    """
    from peft import PeftModel

    if combination not in COMBINATIONS:
        raise HoneError(f"unknown combination {combination!r}", fix=f"use one of: {', '.join(COMBINATIONS)}")
    if len(artifacts) < 2:
        raise HoneError("merging needs at least two adapters")
    bases = {a.manifest.base_model.hash for a in artifacts}
    if len(bases) > 1 or any(a.adapter_dir is None for a in artifacts):
        raise HoneError("merging needs adapter artifacts of the same base model",
                        fix="merge artifacts made by hone tune/align on one base model")
    weights = list(weights) if weights is not None else [1.0 / len(artifacts)] * len(artifacts)
    if len(weights) != len(artifacts):
        raise HoneError(f"{len(weights)} weights for {len(artifacts)} adapters", fix="give one weight per adapter")
    from honellm.models import load

    started = time.perf_counter()
    model, _ = load(artifacts[0].base_model, dtype="fp32", device="cpu")
    names = [f"a{i}" for i in range(len(artifacts))]
    model = PeftModel.from_pretrained(model, artifacts[0].adapter_dir, adapter_name=names[0])
    for name, art in zip(names[1:], artifacts[1:], strict=True):
        model.load_adapter(art.adapter_dir, adapter_name=name)
    kwargs = {"density": density} if combination != "linear" else {}
    try:
        model.add_weighted_adapter(names, weights, "merged", combination_type=combination, **kwargs)
    except ValueError as err:
        raise HoneError(f"peft cannot merge these adapters: {err}",
                        fix="merge LoRA adapters of the same rank and target modules") from None
    for name in names:
        model.delete_adapter(name)
    model.set_adapter("merged")
    seconds = time.perf_counter() - started
    out = Path(out)
    merged = Artifact.create(
        name=f"{task.name}-merge-{combination}", method=f"merge-{combination}", kind="adapter",
        base_model=artifacts[0].base_model, program=artifacts[0].program, task=task,
        config={"combination": combination, "weights": weights, "density": density,
                "adapters": [str(a.path) for a in artifacts]},
        cost=total_cost({f"a{i}": a for i, a in enumerate(artifacts)}, seconds))
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merge-") as tmp:
        model.save_pretrained(tmp, selected_adapters=["merged"], safe_serialization=True)
        folder = Path(tmp) / "merged" if (Path(tmp) / "merged").is_dir() else Path(tmp)
        merged.save(out, force=True, extra_files={"adapter": folder})
    return Artifact.load(out, verify_base=False)
