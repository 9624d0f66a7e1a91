"""Liger Kernel on CUDA (honellm.core.liger): the decision in `support.liger_problem`, the fallback (Liger never
imported on a CPU, transformers' forward and Hone's own loss), and the wiring when it applies, with a fake
`liger_kernel` package whose fused linear cross-entropy is torch's (no Triton here): what Liger's API is called
with, and that the log-probs and gradients through the fused-loss path equal the logits path's."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from honellm.core import liger
from honellm.core.support import liger_problem
from honellm.training.batching import IGNORE, TokenSequence, collate, pack
from honellm.training.logprobs import token_logprobs

CUDA = torch.device("cuda")


def load(path, attention="sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention, dtype=torch.float32)


def fake_liger(monkeypatch, calls: list, head_rows: list | None = None):
    """Install a fake `liger_kernel` whose API records its calls and computes the fused loss with torch."""
    root = types.ModuleType("liger_kernel")
    root.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    transformers_mod = types.ModuleType("liger_kernel.transformers")
    monkey = types.ModuleType("liger_kernel.transformers.monkey_patch")
    monkey.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None, "qwen2": None, "mistral": None, "gemma2": None}

    def apply_to_instance(model, **kwargs):
        calls.append((model, kwargs))

    class FusedLinearCrossEntropy(torch.nn.Module):
        def __init__(self, reduction="mean"):
            super().__init__()
            self.reduction = reduction

        def forward(self, weight, hidden, target, bias=None):
            calls.append(("flce", self.reduction, tuple(hidden.shape)))
            return F.cross_entropy(F.linear(hidden, weight, bias).float(), target, reduction=self.reduction)

    transformers_mod._apply_liger_kernel_to_instance = apply_to_instance
    transformers_mod.LigerFusedLinearCrossEntropyLoss = FusedLinearCrossEntropy
    for name, module in (("liger_kernel", root), ("liger_kernel.transformers", transformers_mod),
                         ("liger_kernel.transformers.monkey_patch", monkey)):
        monkeypatch.setitem(sys.modules, name, module)


def test_liger_steps_aside_on_a_cpu_without_importing_it(arch_dir, monkeypatch):
    monkeypatch.delitem(sys.modules, "liger_kernel", raising=False)
    model = load(arch_dir("llama"))
    assert liger_problem(model, torch.device("cpu")) == "Liger's kernels run on CUDA devices only"
    assert liger.apply(model, torch.device("cpu")) is not None and not liger.active(model)
    assert "liger_kernel" not in sys.modules  # nothing imported Liger (hence Triton) on the CPU
    # On CUDA without the package: the reason names the extra that installs it.
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert "pip install 'honellm[gpu]'" in liger_problem(model, CUDA)
    monkeypatch.setenv("HONE_LIGER", "0")
    assert liger_problem(model, CUDA) == "HONE_LIGER=0"
    monkeypatch.setenv("HONE_FAST", "0")
    assert liger_problem(model, CUDA) == "HONE_FAST=0"


def test_liger_decision_follows_the_architecture_and_liger_s_own_table(arch_dir, monkeypatch):
    calls: list = []
    fake_liger(monkeypatch, calls)
    assert liger_problem(load(arch_dir("llama")), CUDA) is None
    assert "gpt2" in liger_problem(load(arch_dir("gpt2")), CUDA)  # not an architecture Liger patches
    assert "phi3" in liger_problem(load(arch_dir("phi3")), "cuda:0")  # in our list, not in this Liger's table
    # Gemma 2 soft-caps its logits: Liger's kernels apply, the fused loss (the head alone) does not.
    gemma = load(arch_dir("gemma2"), "eager")
    assert liger.apply(gemma, CUDA) is None and calls[-1][0] is gemma and not liger.active(gemma)


def test_liger_older_than_the_per_token_gradient_fix_steps_aside(arch_dir, monkeypatch):
    calls: list = []
    fake_liger(monkeypatch, calls)
    model = load(arch_dir("llama"))
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.8.1")
    problem = liger_problem(model, CUDA)
    assert "0.8.1 is older than 0.8.2" in problem and "reduction='none'" in problem
    assert liger.apply(model, CUDA) == problem and not liger.active(model) and calls == []
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.8.5")
    assert liger_problem(model, CUDA) is None


def sequences():
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (12, 9, 15):
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        out.append(TokenSequence(ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # transformers' forward, and the direct training forward
def test_applied_liger_takes_the_fused_loss_with_the_same_numbers(arch_dir, monkeypatch, attention):
    from peft import LoraConfig, get_peft_model

    calls: list = []
    rows: list[int] = []
    model = get_peft_model(load(arch_dir("llama"), attention), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for batch in (collate(sequences(), 0), pack(sequences())):
        model.zero_grad(set_to_none=True)
        reference = token_logprobs(model, batch)
        # Tokens weighted unequally, signs mixed (DPO's chosen and rejected, RL's advantages): a fused loss that
        # scaled every row's gradient by one upstream value would pass a plain sum.
        weights = torch.linspace(-1.5, 2.0, reference.values.numel())
        (reference.values * weights).sum().backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        fake_liger(monkeypatch, calls)
        base = model.get_base_model()
        if not liger.active(model):
            assert liger.apply(model, CUDA) is None and liger.active(model)
            target, kwargs = calls[-1]
            assert target is base  # Liger patches the causal LM under the PEFT wrapper, not the wrapper
            assert kwargs == {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                              "fused_linear_cross_entropy": False}
        rows.clear()
        handle = base.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(out.shape[0]))
        model.zero_grad(set_to_none=True)
        found = token_logprobs(model, batch)
        handle.remove()
        (found.values * weights).sum().backward()
        assert calls[-1][:2] == ("flce", "none") and calls[-1][2][0] == reference.values.numel()
        assert all(n == 0 for n in rows)  # the LM head itself ran on no row: no logits were materialised
        assert torch.allclose(found.values, reference.values, atol=1e-5)
        assert torch.equal(found.rows, reference.rows) and torch.equal(found.positions, reference.positions)
        for name, grad in expected.items():
            got = dict(model.named_parameters())[name].grad
            assert torch.allclose(got, grad, atol=1e-5, rtol=1e-4), name
        # Entropy needs the logits: the fused loss steps aside for it.
        assert token_logprobs(model, batch, with_entropy=True).entropy is not None
        setattr(base, liger.MARK, False)
