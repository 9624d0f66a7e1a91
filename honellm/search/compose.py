"""Compositions of methods users otherwise wire by hand; each ends in one Artifact whose cost is the total.

- `sft_then_dpo(task, ...)`: supervised tuning on the task's answers (the chosen ones of preference pairs), its
  adapter folded into the base weights (kept in the composition's folder), then DPO from there: the SFT model is
  both the starting policy and DPO's reference, as in the DPO paper's recipe.
- `grpo_from_sft(task, ...)`: the same SFT model, then GRPO from it (the SFT model is the policy's starting point
  and its KL reference).
- `rft_from_best_of_n(task, artifact, ...)`: rejection-sampling fine-tuning with a best-of-n artifact's own
  sampling and reward (n, temperature, reward), from the model it samples from: best-of-n distilled into the
  weights, one sample per request instead of n.
- `prompt_on_adapter(task, artifact, ...)`: the prompt search (instruction, demonstrations, calibration) run
  on the tuned model, so the prompt is chosen for the adapter (in the spirit of DSPy's BetterTogether); the
  artifact keeps the adapter and carries the program found.
- `merge_adapters(task, artifacts, combination=...)`: LoRA adapters combined by peft's `add_weighted_adapter`
  (linear, TIES, DARE-linear, DARE-TIES) into one adapter. As a row of `hone compare` (`merge-ties`, ...), it
  merges LoRA adapters of the same settings trained with MERGE_SEEDS seeds (a soup of seeds, as in Wortsman et
  al.'s model soups, https://arxiv.org/abs/2203.05482), reusing the lora row and its seeds where they ran.

The cost in each manifest (`train_seconds`, `train_tokens`) adds up every part's, so a composition's row in a
comparison is charged for all the work it did; `cost["parts"]` lists the parts. `COMPOSITIONS` offers them as
rows of `hone compare` (`--methods ...,grpo-from-sft`; docs/search.md).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from honellm.artifact import Artifact
from honellm.errors import HoneError

COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties")


def total_cost(parts: dict[str, Artifact | dict], seconds: float = 0.0) -> dict:
    """The seconds (all the work of making each part: `making_seconds`) and train tokens of all `parts`
    (artifacts, or cost dicts) plus `seconds` of the composition's own."""
    from honellm.evaluation.cost import making_seconds

    costs = {name: (p.manifest.cost if isinstance(p, Artifact) else p) or {} for name, p in parts.items()}
    total = round(sum(making_seconds(c) for c in costs.values()) + seconds, 2)
    return {"train_seconds": total, "making_seconds": total,
            "train_tokens": int(sum(int(c.get("train_tokens", 0)) for c in costs.values())),
            "trainable_params": max((int(c.get("trainable_params", 0)) for c in costs.values()), default=0),
            "parts": {name: {"train_seconds": making_seconds(c), "train_tokens": c.get("train_tokens")}
                      for name, c in costs.items()}}


def sft_then_dpo(task, *, sft_method: str = "lora", sft_overrides: list[str] | None = None,
                 dpo_method: str = "dpo", dpo_overrides: list[str] | None = None, out: str | Path,
                 force: bool = False) -> Artifact:
    """SFT (`sft_method`) on `task`'s answers, folded into the weights, then `dpo_method` from it -> Artifact."""
    return _after_sft(task, sft_method, sft_overrides, dpo_method, dpo_overrides, Path(out), "dpo", force)


def grpo_from_sft(task, *, sft_method: str = "lora", sft_overrides: list[str] | None = None,
                  rl_method: str = "grpo", rl_overrides: list[str] | None = None, out: str | Path,
                  force: bool = False) -> Artifact:
    """SFT (`sft_method`) on `task`'s answers, folded into the weights (`out/sft-merged/`), then `rl_method`
    (GRPO) from that model -> Artifact.

    Online RL starts from the SFT model as DeepSeek-R1's and InstructGPT's pipelines do: its fresh LoRA policy
    sits on the merged SFT weights, and its reference (the policy with the adapter disabled) is the SFT model, so
    the KL term keeps the policy near what SFT learned rather than near the base.
    """
    return _after_sft(task, sft_method, sft_overrides, rl_method, rl_overrides, Path(out), rl_method, force)


def _after_sft(task, sft_method: str, sft_overrides, then_method: str, then_overrides, out: Path, folder: str,
               force: bool) -> Artifact:
    """SFT, its adapter folded into the weights, then `then_method` (a reward-family method) on the task's model
    replaced by the folded one; the artifact's method reads `lora+dpo`, its cost adds up both parts."""
    from honellm.methods.catalog import method_config, run_method

    spec, config = method_config(sft_method, None, sft_overrides or [], family="tuning")
    sft = run_method(task, spec, config, out=out / "sft", force=force)
    started = time.perf_counter()
    merged = out / "sft-merged"
    _fold_adapter(sft, merged)
    fold_seconds = time.perf_counter() - started
    spec, config = method_config(then_method, None, then_overrides or [], family="reward")
    then = run_method(_on_model(task, merged), spec, config, out=out / folder, force=force)
    then.manifest.method = f"{sft.manifest.method}+{spec.name}"
    then.manifest.cost = {**(then.manifest.cost or {}), **total_cost({"sft": sft, spec.name: then}, fold_seconds)}
    then.update_manifest(method=then.manifest.method, cost=then.manifest.cost)
    return then


def _on_model(task, model: str | Path):
    """A shallow copy of `task` whose model is `model` (a folder or a name): what the recipes start from."""
    moved = copy.copy(task)
    moved.config = task.config.model_copy(update={"model": str(Path(model).resolve()) if Path(model).exists()
                                                  else str(model)})
    return moved


def rft_from_best_of_n(task, best_of_n: Artifact, *, rft_overrides: list[str] | None = None, out: str | Path,
                       force: bool = False) -> Artifact:
    """Rejection-sampling fine-tuning seeded by a best-of-n artifact: distil what it serves into the weights.

    A best-of-n artifact answers each request by sampling n answers from its policy and serving the one its
    reward scores highest: good answers, at n times the generation plus the reward's scoring per request. RFT
    trains on exactly that choice: it samples n answers per training prompt, keeps the best by the reward, and
    fine-tunes on the kept ones. So this composition runs RFT with the best-of-n artifact's own inference
    settings (n, temperature, top_p, the task's rewards and/or its reward model with its weight) starting from
    the model best-of-n samples from (its adapter, if any, folded into the weights in `out/policy-merged/`;
    else its base model). The result answers with one greedy sample per request, the cost best-of-n paid at
    every request moved into training once. `rft_overrides` set RFT's other settings (and win over the ones
    taken from the artifact); the prompt is the task's own (RFT's recipe builds it), not the artifact's program.
    The cost adds the best-of-n artifact's (its making: no training) and RFT's.
    """
    from honellm.methods.catalog import method_config, run_method

    settings = best_of_n.manifest.inference.best_of_n if best_of_n.manifest.inference else None
    if settings is None:
        raise HoneError("rft_from_best_of_n needs a best-of-n artifact (its manifest has no best_of_n settings)",
                        where=str(best_of_n.path), fix="pass the artifact of `hone align --method best_of_n`")
    out = Path(out)
    started = time.perf_counter()
    if best_of_n.adapter_dir is not None:
        start = out / "policy-merged"
        _fold_adapter(best_of_n, start)
    else:
        start = best_of_n.weights_dir or best_of_n.base_model
    fold_seconds = time.perf_counter() - started
    taken = [f"n={settings.n}", f"temperature={settings.temperature}", f"top_p={settings.top_p}",
             f"task_rewards={str(settings.task_rewards).lower()}",
             f"reward_model_weight={settings.reward_model_weight}"]
    if settings.reward_model:
        taken.append(f"reward_model={settings.reward_model}")
    spec, config = method_config("rft", None, [*taken, *(rft_overrides or [])], family="reward")
    rft = run_method(_on_model(task, start), spec, config, out=out / "rft", force=force)
    rft.manifest.method = "best_of_n+rft"
    rft.manifest.config = {**(rft.manifest.config or {}), "from_best_of_n": str(best_of_n.path),
                           "best_of_n": settings.model_dump(mode="json")}
    rft.manifest.cost = {**(rft.manifest.cost or {}), **total_cost({"best_of_n": best_of_n, "rft": rft},
                                                                     fold_seconds)}
    rft.update_manifest(method=rft.manifest.method, config=rft.manifest.config, cost=rft.manifest.cost)
    return rft


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
    `weights`: one per adapter. By default they average the adapters: 1/k each for linear and dare_linear (peft
    sums the weighted adapters), 1 each for ties and dare_ties (peft already takes the mean of the entries
    whose sign agrees, so 1/k would shrink the update k times). The program is the first artifact's.
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
    mean = combination in ("ties", "dare_ties")  # peft's disjoint merge averages by itself
    weights = list(weights) if weights is not None else [1.0 if mean else 1.0 / len(artifacts)] * len(artifacts)
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


# ----------------------------------------------------------------------------------------- compare's rows


@dataclass(frozen=True)
class Composition:
    """A composition offered as one more row of `hone compare` (`--methods lora,grpo,grpo-from-sft`).

    `parts`: the registered methods it is made of: the task must have the data each needs, and each part runs
    with that method's settings in the comparison (`--set lora:r=8`, the budget shared among the parts it runs).
    `reuses`: parts whose finished row of the same comparison it builds on (their artifact, charged at that row's
    cost) instead of making them again. `make(task, settings, reused, out)` -> Artifact, whose cost is the total;
    `reused` holds those rows' artifacts by method name, and for a row that ran them, `NAME:seeds` (its other
    seeds' artifacts by seed) and `NAME:overrides` (the settings its search found).
    """

    name: str
    family: str
    parts: tuple[str, ...]
    make: Callable[..., Artifact]
    summary: str
    reuses: tuple[str, ...] = ()

    def missing(self, task, config=None) -> tuple[str, str] | None:
        from honellm.methods.catalog import all_methods

        methods = all_methods()
        return next((m for m in (methods[p].missing(task) for p in self.parts) if m is not None), None)


def _make_part(task, method: str, settings: list[str], out: Path) -> Artifact:
    from honellm.methods.catalog import method_config, run_method

    spec, config = method_config(method, None, settings)
    return run_method(task, spec, config, out=out, force=True)


def _sft_then_dpo_row(task, settings, reused, out):
    return sft_then_dpo(task, sft_overrides=settings["lora"], dpo_overrides=settings["dpo"], out=out, force=True)


def _grpo_from_sft_row(task, settings, reused, out):
    return grpo_from_sft(task, sft_overrides=settings["lora"], rl_overrides=settings["grpo"], out=out, force=True)


def _rft_from_best_of_n_row(task, settings, reused, out):
    bon = reused.get("best_of_n") or _make_part(task, "best_of_n", settings["best_of_n"], out / "best_of_n")
    return rft_from_best_of_n(task, bon, rft_overrides=settings["rft"], out=out, force=True)


def _prompt_on_adapter_row(task, settings, reused, out):
    from honellm.methods.catalog import method_config

    adapter = reused.get("lora") or _make_part(task, "lora", settings["lora"], out / "lora")
    _, config = method_config("prompt-search", None, settings["prompt-search"])
    return prompt_on_adapter(task, adapter, config=config, out=out / "prompt", progress=False)


MERGE_SEEDS = 3  # LoRA adapters a merge row combines


def _merge_row(combination: str) -> Callable[..., Artifact]:
    def make(task, settings, reused, out):
        """LoRA adapters of MERGE_SEEDS seeds (the same settings), merged: the lora row's and its seeds' where
        this comparison ran them, the others trained here with the lora row's settings (its best trial's
        settings when it searched)."""
        adapters = {0: reused["lora"]} if "lora" in reused else {}
        adapters.update(reused.get("lora:seeds", {}))
        base = settings["lora"]
        if reused.get("lora:overrides"):  # the searched settings, within this row's share of the budget
            base = [*reused["lora:overrides"], *(o for o in base if o.startswith("max_seconds="))]
        base = [o for o in base if o.split("=", 1)[0].strip() != "seed"]
        for seed in range(MERGE_SEEDS):
            if seed not in adapters:
                adapters[seed] = _make_part(task, "lora", [*base, f"seed={seed}"], out / f"seed-{seed}")
        chosen = [adapters[k] for k in sorted(adapters)[:MERGE_SEEDS]]
        merged = merge_adapters(task, chosen, combination=combination, out=out / "artifact")
        merged.update_manifest(method=f"lora-merge-{combination}")
        return merged
    return make


COMPOSITIONS: dict[str, Composition] = {c.name: c for c in (
    *(Composition(f"merge-{c.replace('_', '-')}", "tuning", ("lora",), _merge_row(c),
                  f"LoRA adapters of {MERGE_SEEDS} seeds merged by peft's {c} combination (a soup of seeds)",
                  reuses=("lora",)) for c in COMBINATIONS),
    Composition("sft-then-dpo", "reward", ("lora", "dpo"), _sft_then_dpo_row,
                "SFT on the chosen answers, folded into the weights, then DPO from that model"),
    Composition("grpo-from-sft", "reward", ("lora", "grpo"), _grpo_from_sft_row,
                "SFT on the answers, folded into the weights, then GRPO from that model"),
    Composition("rft-from-best-of-n", "reward", ("best_of_n", "rft"), _rft_from_best_of_n_row,
                "RFT sampling as the best-of-n row does (its n, temperature, reward): best-of-n in the weights",
                reuses=("best_of_n",)),
    Composition("lora+prompt-search", "tuning", ("lora", "prompt-search"), _prompt_on_adapter_row,
                "the prompt search run on the LoRA row's adapter (as DSPy's BetterTogether)", reuses=("lora",)),
)}
