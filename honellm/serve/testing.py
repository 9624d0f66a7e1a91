"""Adapter artifacts that differ deterministically, for serving tests and benchmarks (nothing is trained).

A freshly initialised LoRA adapter is a no-op (B = 0), so two of them would serve identical text and prove
nothing about adapter switching. These adapters draw A and B from a seeded generator instead, with a large
enough scale that greedy outputs change: each seed gives a different, reproducible model.
"""

from __future__ import annotations

from pathlib import Path


def make_lora_artifact(base_model: str | Path, out: str | Path, *, seed: int, name: str | None = None,
                       system: str | None = None, r: int = 8, alpha: int = 64) -> Path:
    """Write an adapter artifact on `base_model` with random, non-zero LoRA weights drawn from `seed`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from honellm.artifact import Artifact
    from honellm.models import load
    from honellm.prompting.program import PromptProgram

    model, _ = load(base_model, dtype="fp32", device="cpu")
    torch.manual_seed(seed)
    # init_lora_weights=False draws B at random too (PEFT's option for tests), so the adapter changes outputs.
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    out = Path(out)
    artifact = Artifact.create(name=name or out.name, method="lora", base_model=str(base_model), kind="adapter",
                               program=PromptProgram(system=system), config={"seed": seed, "r": r, "alpha": alpha})
    return artifact.save(out, model=peft_model, force=True)
