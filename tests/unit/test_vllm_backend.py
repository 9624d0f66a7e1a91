"""The vLLM backend behind its interface, with a fake engine (no vLLM here): what the engine is built with, LoRA
weights synced each step as a new adapter id without a reload, merged weights copied in for other policies, sleep
mode between phases, the sampler's per-token log-probs; and the importance-sampling correction of the
sampler-vs-trainer mismatch: its math (a hand computation and TRL's formula) and its wiring into GRPO."""

from __future__ import annotations

import importlib.machinery
import json
import math
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from honellm.generation import SamplingParams
from honellm.generation.vllm_backend import VLLMBackend, lora_settings
from honellm.reward.losses import policy_loss, sampler_importance_weights
from honellm.reward.rollout import sampler_logprobs


class FakeLLM:
    """Records what the backend asks of vLLM; generates two tokens with log-probs -0.5 and -1.5."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.launcher = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                         "MASTER_PORT")}
        self.calls: list = []
        self.loaded: list = []
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=lambda weights: self.loaded.append(list(weights))))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            model_runner=runner)), remove_lora=lambda i: self.calls.append(("remove_lora", i)))

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self):
        self.calls.append(("wake_up",))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        self.calls.append(("generate", lora_request.lora_int_id if lora_request else None))
        step = {7: SimpleNamespace(logprob=-0.5, rank=1), 8: SimpleNamespace(logprob=-1.5, rank=2)}
        out = SimpleNamespace(text="ab", token_ids=[7, 8], finish_reason="stop", logprobs=[step, step])
        return [SimpleNamespace(outputs=[out]) for _ in prompts]


@pytest.fixture()
def fake_vllm(monkeypatch):
    root = types.ModuleType("vllm")
    root.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    root.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    root.LLM = FakeLLM
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")

    class LoRARequest:
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    request.LoRARequest = LoRARequest
    for name, module in (("vllm", root), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)


def lora_model(tiny_model_dir, **kwargs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                           **kwargs))


def test_lora_policy_syncs_as_a_new_adapter_id_without_reloading(fake_vllm, tiny_model_dir, tiny_model):
    model = lora_model(tiny_model_dir)
    backend = VLLMBackend(model, tiny_model[1], max_length=128, gpu_memory_utilization=0.3)
    llm = backend.llm
    assert llm.kwargs["enable_lora"] and llm.kwargs["max_lora_rank"] >= 4 and llm.kwargs["enable_sleep_mode"]
    assert llm.kwargs["gpu_memory_utilization"] == 0.3 and llm.kwargs["model"] == str(tiny_model_dir)
    # In this process (TRL's colocate settings), told it is rank 0 of 1; those variables are gone after.
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher" and llm.kwargs["seed"] == 0
    assert llm.launcher["RANK"] == "0" and llm.launcher["WORLD_SIZE"] == "1" and llm.launcher["MASTER_PORT"]
    assert not any(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"))
    assert backend.adapter_id == 1 and not llm.loaded  # the adapter at construction, no weights copied
    first = backend.lora_request.lora_path
    with torch.no_grad():  # a training step changes the adapter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)
    backend.sync_weights()
    assert backend.adapter_id == 2 and backend.lora_request.lora_int_id == 2
    assert ("remove_lora", 1) in llm.calls and ("reset_prefix_cache",) in llm.calls
    saved = load_file(f"{backend.lora_request.lora_path}/adapter_model.safetensors")
    live = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert saved and all(torch.equal(saved[k], live[k.replace(".weight", ".default.weight")])
                         for k in saved if "lora_B" in k)  # the adapter on disk is the current one
    assert json.loads(Path(backend.lora_request.lora_path, "adapter_config.json").read_text())["r"] == 4
    assert first != backend.lora_request.lora_path and not llm.loaded
    out = backend.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, logprobs=True, temperature=0))
    assert llm.calls[-1] == ("generate", 2)  # generation names the newest adapter
    assert out[0].logprobs == [-0.5, -1.5] and out[0].token_ids == [7, 8]
    backend.close()


def test_sleep_mode_between_phases(fake_vllm, tiny_model_dir, tiny_model):
    backend = VLLMBackend(lora_model(tiny_model_dir), tiny_model[1], max_length=128)
    llm = backend.llm
    backend.sleep()
    backend.sleep()  # once asleep, stays asleep
    assert [c for c in llm.calls if c[0] == "sleep"] == [("sleep", 1)] and backend.asleep
    backend.generate([[1, 2]], SamplingParams(max_new_tokens=2))  # the next generation wakes it first
    wake, gen = llm.calls.index(("wake_up",)), max(i for i, c in enumerate(llm.calls) if c[0] == "generate")
    assert wake < gen and not backend.asleep
    backend.sleep()
    slept = len(llm.calls)
    backend.sync_weights()  # syncing wakes it too, before the new adapter
    assert llm.calls[slept] == ("wake_up",) and not backend.asleep
    off = VLLMBackend(lora_model(tiny_model_dir), tiny_model[1], max_length=128, sleep_mode=False)
    off.sleep()
    assert not off.asleep and not any(c[0] == "sleep" for c in off.llm.calls)


def test_other_policies_copy_merged_weights_into_the_engine(fake_vllm, tiny_model_dir, tiny_model):
    model = lora_model(tiny_model_dir, use_dora=True)  # DoRA: vLLM serves no such adapter
    assert lora_settings(model) is None and lora_settings(tiny_model[0]) is None
    backend = VLLMBackend(model, tiny_model[1], max_length=128)
    assert "enable_lora" not in backend.llm.kwargs and backend.lora_request is None
    (weights,) = backend.llm.loaded
    names = [n for n, _ in weights]
    assert not any("lora_" in n or "base_layer" in n for n in names)
    assert "model.layers.0.self_attn.q_proj.weight" in names
    merged = dict(weights)["model.layers.0.self_attn.q_proj.weight"]
    base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(merged, base)  # the adapter was merged in for the copy ...
    assert lora_settings(lora_model(tiny_model_dir)) == {"rank": 4}


# ----------------------------------------------------------------------------------- importance sampling


def trl_ratio(old, sampling, mask, mode, clip_max, clip_min=None):
    """TRL 1.x GRPOTrainer's `vllm_importance_sampling_ratio`, transcribed."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    diff = diff.sum(dim=-1, keepdim=True) if mode in ("sequence_mask", "sequence_truncate") else diff
    ratio = torch.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = clip_min if clip_min is not None else -math.inf
    high = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def test_importance_weights_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler = torch.tensor([[-1.5, -1.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    w = sampler_importance_weights(trainer, sampler, mask, clip_max=1.5)
    # exp(0.5) = 1.6487 capped at 1.5; exp(-1) = 0.3679; NaN sampler log-prob: no correction (1)
    assert torch.allclose(w, torch.tensor([[1.5, math.exp(-1.0), 1.0]]))
    masked = sampler_importance_weights(trainer, sampler, mask, mode="token_mask", clip_max=1.5, clip_min=0.5)
    assert torch.allclose(masked, torch.tensor([[0.0, 0.0, 1.0]]))
    seq = sampler_importance_weights(trainer, sampler, mask, mode="sequence_truncate", clip_max=3.0)
    assert seq.shape == (1, 1) and math.isclose(float(seq), math.exp(-0.5), rel_tol=1e-6)
    with pytest.raises(ValueError, match="token_truncate"):
        sampler_importance_weights(trainer, sampler, mask, mode="tokens")


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_importance_weights_equal_trl_s(mode):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g) * 3
    sampling = old + torch.randn(4, 6, generator=g) * 0.7
    sampling[1, 2] = float("nan")
    mask = (torch.rand(4, 6, generator=g) > 0.2).float()
    for clip_max, clip_min in ((3.0, None), (2.0, 0.5), (None, 0.8)):
        ours = sampler_importance_weights(old, sampling, mask, mode=mode, clip_max=clip_max, clip_min=clip_min)
        assert torch.allclose(ours, trl_ratio(old, sampling, mask, mode, clip_max, clip_min))


def test_the_weights_multiply_the_per_token_loss_before_the_kl_term():
    g = torch.Generator().manual_seed(1)
    logps = -torch.rand(2, 5, generator=g)
    ref = logps - 0.1
    mask = torch.ones(2, 5)
    adv = torch.tensor([1.0, -1.0])
    w = torch.rand(2, 5, generator=g) + 0.5
    plain, _ = policy_loss("bnpo", logps, logps, adv, mask, kl_coef=0.5, ref_logps=ref)
    weighted, metrics = policy_loss("bnpo", logps, logps, adv, mask, kl_coef=0.5, ref_logps=ref, sampler_weights=w)
    kl = torch.exp(ref - logps) - (ref - logps) - 1  # k3
    # ratio 1: the surrogate is -A per token; TRL: (surrogate * w + beta * kl), token mean
    expected = ((-adv[:, None] * w) + 0.5 * kl).mean()
    assert torch.allclose(weighted, expected) and not torch.allclose(plain, expected)
    assert torch.allclose(metrics["sampler_is_ratio"], w.mean())


def test_sampler_logprobs_line_up_with_the_completion_mask():
    completions = [SimpleNamespace(logprobs=[-0.1, -0.2]), SimpleNamespace(logprobs=None),
                   SimpleNamespace(logprobs=[-0.3])]
    out = sampler_logprobs(completions, torch.zeros(3, 3))
    assert out[0, :2].tolist() == pytest.approx([-0.1, -0.2]) and math.isnan(out[0, 2])
    assert torch.isnan(out[1]).all() and out[2, 0].item() == pytest.approx(-0.3)


def test_grpo_applies_the_correction_with_the_sampler_s_logprobs(tiny_model_dir, tmp_path):
    from honellm.reward.recipes.grpo import GRPOConfig, grpo
    from honellm.runs import read_metrics
    from honellm.task import Task
    from honellm.testing import make_tiny_reward_task

    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir))
    # The torch engine samples here (true: correct with any backend); its log-probs are the trainer's (fp32).
    config = GRPOConfig(max_steps=1, prompts_per_step=2, group_size=4, batch_size=8, guard_prompts=4, r=4,
                        max_new_tokens=6, precision="fp32", eval_every=0, dynamic_sampling=False,
                        vllm_importance_sampling_correction=True)
    grpo(task, config, out=tmp_path / "run")
    (train,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "train"]
    assert train["sampler_is_ratio"] == pytest.approx(1.0, abs=1e-3)
    off = config.model_copy(update={"vllm_importance_sampling_correction": None})  # torch engine: off by default
    grpo(task, off, out=tmp_path / "off")
    (train,) = [r for r in read_metrics(tmp_path / "off" / "metrics.jsonl") if r.get("kind") == "train"]
    assert "sampler_is_ratio" not in train
