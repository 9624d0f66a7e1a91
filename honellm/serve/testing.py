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
    from honellm.program import PromptProgram

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


class ScriptedGenerator:
    """A stand-in for `Generator` that answers at once (or when `gate` opens), for tests of the server itself:
    queue limits, timeouts, failures and batching, without the cost or randomness of a model.

    Each completion's text is `"{reply}{i}"` for the i-th prompt of its call; `calls` records every batch.
    A prompt containing `fail_on` makes the whole call raise (as a model error would).
    """

    def __init__(self, *, reply: str = "ok", max_length: int = 512, gate=None, delay: float = 0.0,
                 fail_on: str | None = None, pieces: tuple[str, ...] = ("o", "k")):
        self.reply, self.max_length, self.gate, self.delay, self.fail_on = reply, max_length, gate, delay, fail_on
        self.pieces = pieces
        self.eos_ids = {0}
        self.calls: list[list[str]] = []
        self.params: list = []

    def _wait(self) -> None:
        import time

        if self.gate is not None:
            self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)

    def generate(self, prompts, params, *, shared_prefix=None, progress=False):
        from honellm.generation.params import Completion

        self.calls.append(list(prompts))
        self.params.append(params)
        self._wait()
        if self.fail_on is not None and any(self.fail_on in p for p in prompts):
            raise RuntimeError("scripted failure")
        return [Completion(text=f"{self.reply}{i}", token_ids=[5, 0], finish_reason="stop", prompt_tokens=len(p),
                           completion_tokens=2, logprobs=[-0.5, -0.25] if params.logprobs else None)
                for i, p in enumerate(prompts)]

    def stream(self, prompt, params):
        self.calls.append([prompt])
        self._wait()
        yield from self.pieces

    def stream_batch(self, prompts, params):
        """Each prompt's pieces in turn, as `(index, piece)`; returns None like `stream` (usage is recounted)."""
        self.calls.append(list(prompts))
        self._wait()
        for i in range(len(prompts)):
            for piece in self.pieces:
                yield i, piece
