"""The optional vLLM backend: the same `generate` / `score` contract on a CUDA GPU, through `vllm.LLM`.

vLLM is imported only here and only when chosen. It loads the weights from the model's folder (`name_or_path`);
`sync_weights` pushes the in-memory weights (a PEFT adapter merged in) into the engine, the way TRL's colocate
mode does, for a policy that is being trained. vLLM caches prefixes by itself (automatic prefix caching), so the
`shared_prefix` argument needs no counterpart here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from honellm.errors import HoneError, MissingDependency
from honellm.generation.params import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    ContinuationScore,
    SamplingParams,
)


def vllm_available() -> bool:
    """vLLM is installed and a CUDA GPU is present (vLLM's CPU build is no faster than the torch engine here)."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def _model_folder(model) -> Path | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None)
    if path and Path(path).is_dir() and (Path(path) / "config.json").exists():
        return Path(path)
    return None


def select_backend(requested: str, model) -> str:
    """"torch" or "vllm" for a `Generator(backend=...)` request."""
    if requested == "torch":
        return "torch"
    if requested == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise MissingDependency("the vLLM backend needs the vllm package", where="Generator(backend='vllm')",
                                    fix="pip install 'honellm[vllm]' (on a machine with a CUDA GPU), or use backend='torch'")
        if not torch.cuda.is_available():
            raise HoneError("the vLLM backend needs a CUDA GPU, and none is visible", where="Generator(backend='vllm')",
                            fix="use backend='torch' (or 'auto') on this machine")
        if _model_folder(model) is None:
            raise HoneError("vLLM loads weights from a folder, and this model has none on disk",
                            where="Generator(backend='vllm')", fix="save the model with save_pretrained() first")
        return "vllm"
    return "vllm" if vllm_available() and _model_folder(model) is not None else "torch"


class VLLMBackend:
    """`vllm.LLM` behind the Generator's interface."""

    def __init__(self, model, tokenizer, *, max_length: int, add_special_tokens: bool = False):
        from vllm import LLM

        self.model = model
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        folder = _model_folder(model)
        dtype = next(model.parameters()).dtype
        self.llm = LLM(model=str(folder), tokenizer=str(folder), dtype=str(dtype).removeprefix("torch."),
                       max_model_len=max_length, enable_prefix_caching=True, seed=0)
        if hasattr(model, "peft_config"):  # the folder holds the base model: bring the adapter in
            self.sync_weights()

    def sync_weights(self) -> None:
        """Copy the model's current weights into vLLM (after a training step), merging a PEFT adapter."""
        model = self.model
        is_peft = hasattr(model, "peft_config")
        if is_peft:
            model.merge_adapter()
        try:
            base = model.get_base_model() if is_peft else model
            runner_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
            for name, param in base.named_parameters():
                if is_peft and ("lora_" in name or "original_module" in name):
                    continue
                name = name.replace(".base_layer", "").replace("modules_to_save.default.", "")
                runner_model.load_weights([(name, param.data)])
        finally:
            if is_peft:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()

    def _params(self, params: SamplingParams):
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,  # -1 disables top-k in every vLLM version
            seed=params.seed,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            logprobs=0 if params.logprobs else None,  # 0: only the sampled token's log-probability
            skip_special_tokens=True,
        )

    def generate(self, encoded: list[list[int]], params: SamplingParams, *, progress: bool = False) -> list[Completion]:
        prompts = [{"prompt_token_ids": ids} for ids in encoded]
        outputs = self.llm.generate(prompts, self._params(params), use_tqdm=progress)
        completions = []
        for ids, out in zip(encoded, outputs, strict=True):
            o = out.outputs[0]
            logprobs = None
            if params.logprobs and o.logprobs is not None:
                logprobs = [step[token].logprob for token, step in zip(o.token_ids, o.logprobs, strict=False)]
            completions.append(Completion(
                text=o.text,
                token_ids=list(o.token_ids),
                finish_reason=FINISH_LENGTH if o.finish_reason == "length" else FINISH_STOP,
                prompt_tokens=len(ids),
                completion_tokens=len(o.token_ids),
                logprobs=logprobs,
            ))
        return completions

    def score(self, pairs: list[tuple[list[int], list[int]]], *, progress: bool = False) -> list[ContinuationScore]:
        """Continuation log-likelihoods from vLLM's prompt log-probabilities (rank 1 means the argmax)."""
        from vllm import SamplingParams as VSamplingParams

        params = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        prompts = [{"prompt_token_ids": ctx + cont} for ctx, cont in pairs]
        outputs = self.llm.generate(prompts, params, use_tqdm=progress)
        scores = []
        for (ctx, cont), out in zip(pairs, outputs, strict=True):
            steps = out.prompt_logprobs[len(ctx):]
            picked = [step[token] for token, step in zip(cont, steps, strict=True)]
            scores.append(ContinuationScore(sum(p.logprob for p in picked), len(cont),
                                            all(p.rank == 1 for p in picked)))
        return scores
