"""The optional vLLM backend: the same `generate` / `score` contract on a CUDA GPU, through `vllm.LLM`.

vLLM is imported only here and only when chosen. It loads the base weights from the model's folder
(`name_or_path`) and runs colocated with training, on the same GPU (`gpu_memory_utilization`, half by default) and
in the same process (`distributed_executor_backend="external_launcher"`, TRL's colocate setting: vLLM V1 would
otherwise run its engine in a child process, out of reach of the weight copies below):

- **weights synced each step without a reload** (`sync_weights`, called before each batch of rollouts): a PEFT
  LoRA policy is served with vLLM's LoRA support (`enable_lora`): each sync saves the adapter (a few MB) and the
  next generations name it in a `LoRARequest` with a new adapter id, so vLLM loads the new adapter and keeps the
  base weights; any other policy (full fine-tuning, DoRA, IA3, an adapter with `modules_to_save`) has its weights
  (an adapter merged in) copied into the engine's model with its `load_weights`, the way TRL's colocate mode does;
- **sleep mode between phases** (`sleep` after the rollouts, `wake_up` at the next generation): vLLM frees its KV
  cache and moves its weights off the GPU (level 1) while the trainer takes its step;
- **per-token log-probs of the sampler** (`SamplingParams(logprobs=True)` → `Completion.logprobs`, the raw
  model's, like the trainer's), which the GRPO recipe compares with the trainer's to correct the mismatch
  (`honellm.reward.losses.sampler_importance_weights`, TRL's `vllm_importance_sampling_correction`).

vLLM caches prefixes by itself (automatic prefix caching), so the `shared_prefix` argument needs no counterpart
here. The unit tests run all of this against a fake engine (tests/unit/test_vllm_backend.py); on a GPU it is
unmeasured so far (bench/README.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import tempfile
import weakref
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

GPU_MEMORY_SHARE = 0.5


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


def lora_settings(model) -> dict | None:
    """`{"rank": r}` when `model` is a PEFT LoRA model vLLM can serve as an adapter (plain LoRA, no DoRA, no
    `modules_to_save`, one adapter); None otherwise (its weights are then merged and copied in)."""
    config = getattr(model, "active_peft_config", None) if hasattr(model, "peft_config") else None
    if config is None or str(getattr(config, "peft_type", "")).split(".")[-1] != "LORA":
        return None
    if getattr(config, "use_dora", False) or getattr(config, "modules_to_save", None) or len(model.peft_config) != 1:
        return None
    return {"rank": int(config.r)}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def _launcher_variables():
    """The variables vLLM's `external_launcher` reads while it sets itself up: those `torchrun` / `accelerate
    launch` set, else rank 0 of 1 on a free local port. Those set here are removed after, so that a later
    `Accelerator` in this process does not take a lone run for a distributed one."""
    added = {}
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        if name not in os.environ:
            added[name] = value
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            added["MASTER_PORT"] = str(probe.getsockname()[1])
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _engine(**kwargs):
    from vllm import LLM

    return LLM(**kwargs)


class VLLMBackend:
    """`vllm.LLM` behind the Generator's interface, colocated with the model it mirrors (see the module docstring).

    `engine` builds the `vllm.LLM` from its keyword arguments (the tests pass a fake)."""

    SLEEP_LEVEL = 1  # level 1 keeps the (base) weights in CPU memory; LoRA syncs never rewrite them

    def __init__(self, model, tokenizer, *, max_length: int, add_special_tokens: bool = False,
                 gpu_memory_utilization: float = GPU_MEMORY_SHARE, sleep_mode: bool = True, engine=None):
        self.model = model
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        folder = _model_folder(model)
        dtype = next(model.parameters()).dtype
        self.lora = lora_settings(model)
        self.sleep_mode = sleep_mode
        self.asleep = False
        self.adapter_id = 0  # a new id per sync: vLLM caches adapters by id
        self.lora_request = None
        self._adapter_root = Path(tempfile.mkdtemp(prefix="hone-vllm-lora-")) if self.lora else None
        if self._adapter_root is not None:  # the synced adapters go with the backend (or at exit), close() or not
            weakref.finalize(self, shutil.rmtree, self._adapter_root, ignore_errors=True)
        # vLLM shares the GPU with the Hugging Face model it mirrors (and, in RL, with its optimizer state), so it
        # takes half of the memory rather than its default 90%.
        kwargs = dict(model=str(folder), tokenizer=str(folder), dtype=str(dtype).removeprefix("torch."),
                      max_model_len=max_length, enable_prefix_caching=True, seed=_rank(),
                      gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep_mode,
                      # In this process (vLLM V1 otherwise runs its engine in a child process, where the weights
                      # cannot be copied in): TRL's colocate mode does the same.
                      distributed_executor_backend="external_launcher",
                      # V1's memory profiler takes the default (larger) batch as needing more than it has.
                      max_num_batched_tokens=max(4096, max_length))
        if self.lora:
            kwargs.update(enable_lora=True, max_lora_rank=max(8, self.lora["rank"]), max_loras=1)
        with _launcher_variables():
            self.llm = (engine or _engine)(**kwargs)
        if hasattr(model, "peft_config"):  # the folder holds the base model: bring the adapter in
            self.sync_weights()

    # ------------------------------------------------------------------------------------------- phases

    def sleep(self) -> None:
        """Free the GPU for the trainer between generation phases (vLLM's sleep mode; no-op without it)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=self.SLEEP_LEVEL)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sync_weights(self) -> None:
        """Make the engine generate with the model's current weights (after a training step), without reloading
        the model: a new LoRA adapter id, or the (merged) weights copied into the engine's model."""
        self.wake_up()
        if self.lora:
            self._sync_adapter()
        else:
            self._sync_merged()
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def _sync_adapter(self) -> None:
        from vllm.lora.request import LoRARequest

        previous = self.adapter_id
        self.adapter_id += 1
        path = self._adapter_root / f"v{self.adapter_id}"
        self.model.save_pretrained(str(path))  # the adapter only: adapter_config.json + adapter_model.safetensors
        saved = path / "default" if (path / "default").is_dir() else path
        self.lora_request = LoRARequest(f"hone-{self.adapter_id}", self.adapter_id, str(saved))
        if previous:
            remove = getattr(getattr(self.llm, "llm_engine", None), "remove_lora", None)
            if remove is not None:
                remove(previous)  # the old adapter leaves vLLM's cache (it is never asked for again)
            shutil.rmtree(self._adapter_root / f"v{previous}", ignore_errors=True)

    def _sync_merged(self) -> None:
        model = self.model
        is_peft = hasattr(model, "peft_config")
        if is_peft:
            model.merge_adapter()
        try:
            base = model.get_base_model() if is_peft else model
            weights = []
            for name, param in base.named_parameters():
                if is_peft and ("lora_" in name or "original_module" in name):
                    continue
                weights.append((name.replace(".base_layer", "").replace("modules_to_save.default.", ""), param.data))
            _runner_model(self.llm).load_weights(weights)
        finally:
            if is_peft:
                model.unmerge_adapter()

    def close(self) -> None:
        if self._adapter_root is not None:
            shutil.rmtree(self._adapter_root, ignore_errors=True)

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

    def _generate(self, prompts, params, progress: bool):
        self.wake_up()
        extra = {"lora_request": self.lora_request} if self.lora_request is not None else {}
        return self.llm.generate(prompts, params, use_tqdm=progress, **extra)

    def generate(self, encoded: list[list[int]], params: SamplingParams, *, progress: bool = False) -> list[Completion]:
        prompts = [{"prompt_token_ids": ids} for ids in encoded]
        outputs = self._generate(prompts, self._params(params), progress)
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
        outputs = self._generate(prompts, params, progress)
        scores = []
        for (ctx, cont), out in zip(pairs, outputs, strict=True):
            steps = out.prompt_logprobs[len(ctx):]
            picked = [step[token] for token, step in zip(cont, steps, strict=True)]
            scores.append(ContinuationScore(sum(p.logprob for p in picked), len(cont),
                                            all(p.rank == 1 for p in picked)))
        return scores


def _runner_model(llm):
    """The torch model inside a `vllm.LLM` (in this process: `external_launcher`), across vLLM's engine layouts."""
    executor = llm.llm_engine.model_executor
    worker = executor.driver_worker
    worker = getattr(worker, "worker", worker)  # V1 wraps the worker
    return worker.model_runner.model
