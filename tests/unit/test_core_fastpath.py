"""The direct LLaMA-family training forward (honellm.core.fastpath) against transformers' own, on the tiny model."""

from __future__ import annotations

import gc
import time

import pytest
import torch

from honellm.core import fastpath, fused
from honellm.models import load
from honellm.training.batching import collate, encode_conversation
from honellm.training.logprobs import sft_loss
from honellm.training.precision import Precision
from honellm.training.setup import enable_checkpointing, seed_everything
from honellm.tuning import get_method


def _batch(tokenizer):
    convs = [([{"role": "system", "content": "Classify."}, {"role": "user", "content": "a warm, funny film"}], "positive"),
             ([{"role": "user", "content": "dull"}], "negative, and far too long"),
             ([{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}], "neutral")]
    return collate([encode_conversation(tokenizer, m, a, max_length=128) for m, a in convs], tokenizer.pad_token_id)


def _model(tiny_model_dir, method, attention="eager"):
    seed_everything(0)
    model, tokenizer = load(tiny_model_dir, dtype="fp32", device="cpu")
    model.set_attn_implementation(attention)
    if method != "full":
        spec = get_method(method)
        model = spec.apply(model, spec.config(), str(tiny_model_dir))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; make the adapter do something
                torch.nn.init.normal_(p, std=0.1)
    return model.train(), tokenizer


def _loss_and_grads(model, batch, monkeypatch, fast: bool, autocast: bool = False):
    monkeypatch.setenv("HONE_FAST_FORWARD", "1" if fast else "0")
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = sft_loss(model, batch)
    out.total.backward()
    return out.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _direct_equals_transformers(model, batch, monkeypatch, layers: int) -> None:
    """Loss and gradients of the direct forward (checked to run) equal transformers' path's up to summation order:
    its last layer runs its output projection and MLP on the rows the loss reads only, so a weight's gradient sums
    fewer zero rows (in fp32, within a few units in the last place; anything the direct forward computed wrongly
    would show as orders of magnitude more)."""
    calls = []
    original = fastpath._layer
    monkeypatch.setattr(fastpath, "_layer", lambda *a: calls.append(1) or original(*a))
    fast, fast_grads = _loss_and_grads(model, batch, monkeypatch, fast=True)
    assert len(calls) == layers  # the direct forward ran
    slow, slow_grads = _loss_and_grads(model, batch, monkeypatch, fast=False)
    assert len(calls) == layers  # and transformers' did not call it
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=0)
    assert fast_grads.keys() == slow_grads.keys() and fast_grads
    for name, grad in slow_grads.items():
        assert (fast_grads[name] - grad).abs().max().item() <= 1e-6 * grad.abs().max().item(), name


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "full"])
def test_direct_forward_equals_transformers_in_fp32(tiny_model_dir, monkeypatch, method):
    """Bit for bit: a run trains to the same weights whichever path it takes (sdpa, FSDP and hooked runs take
    transformers')."""
    model, tokenizer = _model(tiny_model_dir, method)
    assert fastpath.decoder_of(model) is not None
    _direct_equals_transformers(model, _batch(tokenizer), monkeypatch, model.config.num_hidden_layers)


def _close_in_the_recipes_setting(tiny_model_dir, monkeypatch, batch_of, *, reference_fast: bool, loss_tol: float):
    """Frozen bf16 weights, fp32 adapters, autocast, the fused LoRA layers, with and without gradient checkpointing:
    the direct forward (sharing a prefix where the batch has one) against a reference computing every sequence in
    full, through transformers' path (`reference_fast=False`) or the direct one."""
    model, tokenizer = _model(tiny_model_dir, "lora")
    Precision.resolve("bf16", "cpu").cast_model(model)
    fused.install(model)
    batch = batch_of(tokenizer)
    monkeypatch.setenv("HONE_SHARED_PREFIX", "0")
    expected, expected_grads = _loss_and_grads(model, batch, monkeypatch, fast=reference_fast, autocast=True)
    monkeypatch.delenv("HONE_SHARED_PREFIX")
    layers = []
    original = fastpath._layer
    monkeypatch.setattr(fastpath, "_layer", lambda *a: layers.append(1) or original(*a))
    fused_calls = []
    apply = fused.LoraLinearFunction.apply
    monkeypatch.setattr(fused.LoraLinearFunction, "apply", lambda *a: fused_calls.append(1) or apply(*a))
    for checkpointing in (False, True):
        if checkpointing:
            enable_checkpointing(model)
        layers.clear()
        fused_calls.clear()
        got, got_grads = _loss_and_grads(model, batch, monkeypatch, fast=True, autocast=True)
        # the direct forward and the fused LoRA layers ran (a silent fallback would compare a path with itself)
        assert len(layers) == model.config.num_hidden_layers * (2 if checkpointing else 1)  # recomputed: twice
        assert fused_calls  # (the direct forward computes some adapted products itself)
        torch.testing.assert_close(got, expected, rtol=loss_tol, atol=loss_tol)
        for name, grad in expected_grads.items():
            assert got_grads[name].dtype == torch.float32
            scale = grad.abs().max().item() + 1e-6
            assert (got_grads[name] - grad).abs().max().item() <= 0.02 * scale, name


def test_direct_forward_in_the_recipes_setting_bf16_fused_lora_checkpointing(tiny_model_dir, monkeypatch):
    _close_in_the_recipes_setting(tiny_model_dir, monkeypatch, _batch, reference_fast=False, loss_tol=1e-3)


@pytest.mark.parametrize("batch_of", ["plain", "shared"])
def test_bf16_layers_take_the_native_kernels_with_torchs_loss_and_gradients(tiny_model_dir, monkeypatch, batch_of):
    """Where `honellm.core.native`'s elementwise kernels run, every RMSNorm (frozen weight), SwiGLU and rotary layout of
    a bf16 LoRA step (with and without a shared prefix) goes through them, forward and backward, and the step's loss and gradients are those of the torch
    operations they replace (the same rounding; fp32 sums in another order)."""
    from honellm.core import native

    if not native.training_kernels():
        pytest.skip(f"the native kernels are not available here: {native.status()}")
    model, tokenizer = _model(tiny_model_dir, "lora")
    Precision.resolve("bf16", "cpu").cast_model(model)
    fused.install(model)
    batch = (_batch if batch_of == "plain" else _shared_batch)(tokenizer)
    if batch_of == "shared":
        assert fastpath.shared_prefix(batch.input_ids, batch.attention_mask)
    calls = {name: 0 for name in ("rms_norm", "rms_norm_backward", "swiglu", "swiglu_backward", "qkv_rotary",
                                  "qkv_rotary_backward")}
    for name in calls:
        original = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _f=original, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _f(*a))
    got, got_grads = _loss_and_grads(model, batch, monkeypatch, fast=True, autocast=True)
    layers = model.config.num_hidden_layers
    # The first norm's input, the frozen embeddings' output, needs no gradient.
    assert calls == {"rms_norm": 2 * layers + 1, "rms_norm_backward": 2 * layers, "swiglu": layers,
                     "swiglu_backward": layers, "qkv_rotary": layers, "qkv_rotary_backward": layers}
    monkeypatch.setattr(native, "training_kernels", lambda: False)
    monkeypatch.setattr(native, "rms_norm", lambda *a: None)
    monkeypatch.setattr(native, "qkv_rotary_applies", lambda *a: False)
    expected, expected_grads = _loss_and_grads(model, batch, monkeypatch, fast=True, autocast=True)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert got_grads.keys() == expected_grads.keys() and got_grads
    for name, grad in expected_grads.items():
        assert (got_grads[name] - grad).abs().max().item() <= 0.02 * (grad.abs().max().item() + 1e-6), name


def test_transformers_path_where_the_direct_one_would_differ(tiny_model_dir, monkeypatch):
    model, _ = _model(tiny_model_dir, "lora")
    assert fastpath.decoder_of(model) is not None
    monkeypatch.setenv("HONE_FAST_FORWARD", "0")
    assert fastpath.decoder_of(model) is None
    monkeypatch.delenv("HONE_FAST_FORWARD")
    handle = model.get_base_model().model.layers[0].mlp.register_forward_hook(lambda *_: None)
    assert fastpath.decoder_of(model) is None  # a user's hook must run
    handle.remove()
    model.get_base_model().model.layers[0].compile(dynamic=True)
    assert fastpath.decoder_of(model) is None  # compile=true compiles transformers' layers
    sdpa, _ = _model(tiny_model_dir, "lora", "sdpa")
    assert fastpath.decoder_of(sdpa) is None
    prompt, _ = _model(tiny_model_dir, "prompt_tuning")
    assert fastpath.decoder_of(prompt) is None  # virtual tokens change the input
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert fastpath.decoder_of(wrapper) is None  # DDP / FSDP wrappers hook their own forward


def test_direct_forward_runs_inside_ddp_and_gives_the_same_gradients(tiny_model_dir, monkeypatch, tmp_path):
    """Under DDP the direct forward runs inside DDP's own forward (which prepares the gradient reducer); one process
    of a one-process group, fp32: the same loss and gradients as transformers' path through the same wrapper."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, tokenizer = _model(tiny_model_dir, "lora")
    batch = _batch(tokenizer)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        _direct_equals_transformers(ddp, batch, monkeypatch, model.config.num_hidden_layers)
        assert "forward" not in model.__dict__  # the wrapped module has its own forward back
    finally:
        # Tear down in this order, the GIL released first: gloo's worker thread frees its last all-reduce work
        # item, which needs the GIL, and the group's destructor (run when DDP's reducer is freed) joins that
        # thread while holding the GIL. Freed at the test's return instead, it deadlocked once in about ten runs.
        time.sleep(0.5)
        ddp = None
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.parametrize("weight_trains", [False, True])
def test_rms_norm_function_gradients_equal_autograd(weight_trains):
    """Against autograd through the textbook formula (the function normalises in fp32, as LlamaRMSNorm does)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    weight = torch.nn.Parameter(torch.rand(16) + 0.5, requires_grad=weight_trains)
    grad = torch.randn(2, 5, 16)
    reference = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    expected = torch.autograd.grad(reference, [x, weight] if weight_trains else [x], grad)
    got = torch.autograd.grad(fastpath.RMSNormFunction.apply(x, weight, 1e-6), [x, weight] if weight_trains else [x], grad)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


SYSTEM = "Classify the sentiment of the movie review as positive or negative. Answer with one word."


def _shared_batch(tokenizer, completion_only=True):
    """Sequences of different lengths that share a long system prompt and template."""
    texts = [("a warm, funny film", "positive"), ("dull", "negative"),
             ("The quick brown fox jumps over the lazy dog, twice.", "neutral, and far too long")]
    convs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Review: " + t}] for t, _ in texts]
    return collate([encode_conversation(tokenizer, m, a, max_length=128, completion_only=completion_only)
                    for m, (_, a) in zip(convs, texts, strict=True)], tokenizer.pad_token_id)


def test_shared_prefix_finds_the_common_real_tokens(tiny_model_dir, monkeypatch):
    _, tokenizer = _model(tiny_model_dir, "lora")
    batch = _shared_batch(tokenizer)
    ids, mask = batch.input_ids, batch.attention_mask
    prefix = fastpath.shared_prefix(ids, mask)
    assert prefix >= fastpath.MIN_SHARED_PREFIX
    assert (ids[:, :prefix] == ids[:1, :prefix]).all() and not (ids[:, prefix] == ids[0, prefix]).all()
    assert fastpath.shared_prefix(ids[:1], mask[:1]) == 0  # one sequence: nothing to share
    same = ids[:1].expand(3, -1).clone()  # identical sequences: each keeps a token of its own
    assert fastpath.shared_prefix(same, mask[:1].expand(3, -1)) == int(mask[0].sum()) - 1
    assert fastpath.shared_prefix(_batch(tokenizer).input_ids, _batch(tokenizer).attention_mask) == 0  # too short
    padded = mask.clone()
    padded[1, 5:] = 0  # a sequence shorter than the common tokens: only its real ones count
    assert fastpath.shared_prefix(ids, padded) == 0
    monkeypatch.setenv("HONE_SHARED_PREFIX", "0")
    assert fastpath.shared_prefix(ids, mask) == 0


@pytest.mark.parametrize("completion_only", [True, False])
@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_a_shared_prefix_gives_the_same_loss_and_gradients(tiny_model_dir, monkeypatch, method, completion_only):
    """fp32: the prefix computed once gives the per-sequence forward's loss and gradients up to summation order
    (with a loss on every token too, so the prefix's own positions are read back per sequence)."""
    model, tokenizer = _model(tiny_model_dir, method)
    batch = _shared_batch(tokenizer, completion_only)
    runs = []
    original = fastpath._direct_shared
    monkeypatch.setattr(fastpath, "_direct_shared", lambda *a: runs.append(a[4]) or original(*a))
    shared, shared_grads = _loss_and_grads(model, batch, monkeypatch, fast=True)
    assert runs and runs[0] >= fastpath.MIN_SHARED_PREFIX  # the shared forward ran
    monkeypatch.setenv("HONE_SHARED_PREFIX", "0")
    plain, plain_grads = _loss_and_grads(model, batch, monkeypatch, fast=True)
    assert len(runs) == 1
    torch.testing.assert_close(shared, plain, rtol=1e-6, atol=1e-5)
    assert shared_grads.keys() == plain_grads.keys() and shared_grads
    for name, grad in plain_grads.items():
        scale = grad.abs().max().item()
        assert (shared_grads[name] - grad).abs().max().item() <= 1e-5 * scale, name


def test_a_shared_prefix_in_the_recipes_setting_bf16_fused_lora_checkpointing(tiny_model_dir, monkeypatch):
    _close_in_the_recipes_setting(tiny_model_dir, monkeypatch, _shared_batch, reference_fast=True, loss_tol=1e-2)
