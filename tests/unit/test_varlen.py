"""`hone_varlen` (honellm.core.varlen): PyTorch's varlen attention behind transformers' attention interface.

The kernel itself runs on CUDA only (tests/unit/test_gpu.py runs it there). Here a plain stand-in with its
signature and contract (token-major [T, heads, d] inputs, cumulative lengths, causal / left-window bounds, grouped
heads) takes its place, so everything around it is checked on a CPU: the layouts, the grouped heads, the windows,
the cumulative lengths transformers passes through, the mask it must not build, the sdpa path for every other
forward, gradient checkpointing, the eligibility rules, the self-check, and SFT's choice of kernel and packing.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from honellm.core import support, varlen
from honellm.training.batching import collate, pack
from honellm.training.setup import enable_checkpointing
from tests.unit.test_packing import assert_close, load_fp32, loss_and_grads, sequences

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def stand_in(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
             enable_gqa=False, calls=None):
    """torch's `varlen_attn` contract, checked, then computed one sequence at a time (`_flash_math`)."""
    assert query.dim() == 3 and cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    assert max_q == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    assert enable_gqa or key.shape[1] == query.shape[1]
    assert window_size[1] == 0  # causal
    out = _flash_math(query, key, value, cu_seq_q, scale, False, window_size)[0]
    if calls is not None:
        calls.append(len(cu_seq_q) - 1)
    return out


@pytest.fixture
def kernel(monkeypatch):
    """The stand-in as `support.varlen_kernel()`; yields the list of calls (sequences per call)."""
    calls: list[int] = []

    @functools.wraps(stand_in)  # its signature: window bounds and grouped heads, as torch 2.11+'s kernel
    def fake(*args, **kwargs):
        return stand_in(*args, **kwargs, calls=calls)

    monkeypatch.setattr(support, "varlen_kernel", lambda: fake)
    support.KERNEL_PARAMETERS.clear()
    varlen._self_check.cache_clear()
    yield calls
    support.KERNEL_PARAMETERS.clear()
    varlen._self_check.cache_clear()


def test_varlen_layouts_grouped_heads_and_windows_match_per_sequence_attention(kernel):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 12]
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    query, key, value = (torch.randn(1, h, 20, 8, generator=g) for h in (4, 2, 2))
    for window in (None, 3):
        got = varlen.varlen(query, key, value, cu, cu, max(lengths), max(lengths), window=window)
        assert got.shape == (1, 20, 4, 8)
        torch.testing.assert_close(got, varlen.reference(query, key, value, cu, window=window))
    # value heads narrower than the query's (MLA): padded for the kernel, cropped after
    narrow = varlen.varlen(query, key, value[..., :5], cu, cu, 12, 12)
    torch.testing.assert_close(narrow, varlen.reference(query, key, value, cu)[..., :5])


def test_an_older_kernel_without_scale_or_grouped_heads_computes_the_same(monkeypatch):
    """torch 2.10's signature: `is_causal` instead of window bounds, no `scale`, no `enable_gqa`."""
    seen = []

    def older(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
        seen.append(key.shape[1])
        return stand_in(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, 0 if is_causal else -1))

    monkeypatch.setattr(support, "varlen_kernel", lambda: older)
    g = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 9, 20], dtype=torch.int32)
    query, key, value = (torch.randn(1, h, 20, 8, generator=g) for h in (4, 1, 1))
    got = varlen.varlen(query, key, value, cu, cu, None, None, scale=0.2)
    torch.testing.assert_close(got, varlen.reference(query, key, value, cu, scale=0.2))
    assert seen == [4]  # the key/value heads repeated for a kernel without grouped heads


# llama and qwen2 (GQA, q/k/v biases), mistral (8-token windows, shorter than the sequences), gemma3 (windowed and
# global layers, its own attention scale), phi3 (fused projections), qwen3_moe (q/k norms, experts).
ARCHS = ["llama", "qwen2", "mistral", "gemma3", "phi3", "qwen3_moe"]


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_batches_under_hone_varlen_equal_padded_sdpa(arch_dir, arch, kernel):
    padded_model = load_fp32(arch_dir(arch), "sdpa")
    model = load_fp32(arch_dir(arch), "sdpa")
    assert support.varlen_problem(model, CUDA) is None
    varlen.install(model)
    assert model.config._attn_implementation == varlen.NAME
    seqs = sequences()
    assert_close(loss_and_grads(padded_model, collate(seqs, 0)), loss_and_grads(model, pack(seqs)))
    layers = model.config.num_hidden_layers
    assert kernel == [len(seqs)] * layers  # every layer took the kernel, with every sequence's bounds


def test_a_packed_forward_builds_no_mask_and_needs_the_lengths(arch_dir, kernel, monkeypatch):
    from transformers import masking_utils

    model = load_fp32(arch_dir("mistral"), "sdpa")
    varlen.install(model)
    built = []
    real = masking_utils.sdpa_mask
    monkeypatch.setattr(masking_utils, "sdpa_mask", lambda *a, **k: built.append(1) or real(*a, **k))
    batch = pack(sequences())
    loss_and_grads(model, batch)
    assert built == [] and kernel  # no [row x row] mask: the kernel had the lengths
    with varlen.packed_forward(), pytest.raises(RuntimeError, match="cu_seq_lens_q"):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)


def test_gradient_checkpointing_recomputes_with_the_lengths(arch_dir, kernel):
    model = load_fp32(arch_dir("llama"), "sdpa")
    varlen.install(model)
    batch = pack(sequences())
    plain = loss_and_grads(model, batch)
    enable_checkpointing(model)
    kernel.clear()
    assert_close(plain, loss_and_grads(model, batch))
    assert len(kernel) == 2 * model.config.num_hidden_layers  # forward, then again in backward


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_every_other_forward_is_sdpa_exactly(arch_dir, arch, kernel, monkeypatch):
    from honellm.generation import Generator, SamplingParams

    monkeypatch.setenv("HONE_FAST", "0")  # generation through transformers' forward (mistral: with the runner's masks)

    sdpa = load_fp32(arch_dir(arch), "sdpa").eval()
    model = load_fp32(arch_dir(arch), "sdpa").eval()
    varlen.install(model)
    seqs = sequences()
    assert_close(loss_and_grads(sdpa, collate(seqs, 0)), loss_and_grads(model, collate(seqs, 0)))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(arch_dir(arch))
    prompts = ["the cat sat on the mat and then", "one two"]
    params = SamplingParams(max_new_tokens=6)
    answers = [Generator(m, tokenizer).generate(prompts, params) for m in (sdpa, model)]
    assert [c.token_ids for c in answers[0]] == [c.token_ids for c in answers[1]]
    assert kernel == []  # nothing here was packed


def test_the_saved_config_does_not_name_hone_varlen(arch_dir, kernel, tmp_path):
    model = load_fp32(arch_dir("llama"), "sdpa")
    varlen.install(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert varlen.NAME not in json.dumps(saved)


def test_the_rules_say_why_not(arch_dir, kernel, monkeypatch):
    from transformers import AutoConfig

    llama = AutoConfig.from_pretrained(arch_dir("llama"))
    assert support.varlen_problem(llama, CUDA, torch.bfloat16) is None
    assert "CUDA" in support.varlen_problem(llama, CPU)
    assert "fp16/bf16" in support.varlen_problem(llama, CUDA, torch.float32)
    assert "soft-capped" in support.varlen_problem(AutoConfig.from_pretrained(arch_dir("gemma2")), CUDA)
    llama.attention_dropout = 0.1
    assert "dropout" in support.varlen_problem(llama, CUDA)
    mistral = AutoConfig.from_pretrained(arch_dir("mistral"))
    monkeypatch.setattr(support, "varlen_kernel", lambda: lambda q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal: q)
    assert "window" in support.varlen_problem(mistral, CUDA)  # torch 2.10's kernel has no window bounds
    monkeypatch.setattr(support, "varlen_kernel", lambda: None)
    assert "2.10" in support.varlen_problem(mistral, CUDA)
    monkeypatch.setenv("HONE_VARLEN", "0")
    assert support.varlen_problem(mistral, CUDA) == "HONE_VARLEN=0"


def test_usable_self_checks_in_the_models_head_shape(arch_dir, kernel, monkeypatch):
    from transformers import AutoConfig

    asked = []
    monkeypatch.setattr(varlen, "self_check", lambda device, dtype, **shape: asked.append((dtype, shape)))
    assert varlen.usable(AutoConfig.from_pretrained(arch_dir("gemma3")), CUDA, torch.float16) is None
    assert varlen.usable(load_fp32(arch_dir("qwen2"), "sdpa"), CUDA, None) is None
    assert asked == [(torch.float16, {"heads": 4, "kv_heads": 2, "head_dim": 16, "window": 8, "static": False}),
                     (torch.bfloat16, {"heads": 4, "kv_heads": 2, "head_dim": 16, "window": None, "static": False})]
    assert "CUDA" in varlen.usable(AutoConfig.from_pretrained(arch_dir("llama")), CPU, torch.bfloat16)
    assert len(asked) == 2  # a rule that says no asks for no self-check


def test_self_check_passes_the_contract_and_catches_a_wrong_kernel(kernel, monkeypatch):
    assert varlen.self_check(CPU, torch.bfloat16) is None
    assert varlen.self_check(CPU, torch.bfloat16, heads=4, kv_heads=1, head_dim=16, window=8) is None

    @functools.wraps(stand_in)
    def leaky(query, key, value, cu_q, cu_k, max_q, max_k, **options):  # attends across sequence boundaries
        whole = torch.tensor([0, query.shape[0]], dtype=torch.int32)
        return stand_in(query, key, value, whole, whole, query.shape[0], query.shape[0], **options)

    monkeypatch.setattr(support, "varlen_kernel", lambda: leaky)
    varlen._self_check.cache_clear()
    found = varlen.self_check(CPU, torch.bfloat16)
    assert found is not None and "disagrees" in found and "tolerance" in found

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(support, "varlen_kernel", lambda: broken)
    varlen._self_check.cache_clear()
    assert "no kernel image" in varlen.self_check(CPU, torch.bfloat16)


def test_runs_pack_on_cuda_with_either_varlen_kernel(arch_dir, monkeypatch):
    """`setup.decide_packing`, which SFT and the DPO family ask with their `packing` and `attention` settings."""
    from honellm.training import setup

    model = load_fp32(arch_dir("llama"), "sdpa")
    bf16 = torch.bfloat16

    def decide(device, asked=None, attention="auto"):
        return setup.decide_packing(asked, attention, model, device, bf16)

    monkeypatch.setattr(setup, "has_flash_attn", lambda: False)
    monkeypatch.setattr(varlen, "usable", lambda *a: "no varlen kernel here")
    # sdpa would attend over the whole packed row; the reason is what the run log says
    assert decide(CUDA) == (False, "no varlen kernel here")
    monkeypatch.setattr(varlen, "usable", lambda *a: None)
    assert decide(CUDA) == (True, None)
    assert decide(CPU) == (False, None)  # a CPU does not pack by default: nothing to say
    packing, why = decide(CUDA, attention="sdpa")  # a kernel asked for: padded
    assert not packing and "attention=sdpa" in why
    assert setup.pick_attention(model, "auto", device=CUDA, longest=64, packed=True) == varlen.NAME
    assert setup.pick_attention(model, "auto", device=CUDA, longest=64, packed=False) == "sdpa"
    assert setup.pick_attention(model, "auto", device=CPU, longest=64, packed=True) == "eager"
    assert decide(CUDA, asked=False) == (False, None)  # as asked
    monkeypatch.setattr(setup, "has_flash_attn", lambda: True)
    monkeypatch.setattr(varlen, "usable", lambda *a: "no varlen kernel here")
    assert decide(CUDA) == (True, None)  # flash-attention's kernel
    assert decide(CPU, asked=True) == (True, None)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_packed_sequences_keep_their_own_log_prob_sums(arch_dir, arch, kernel):
    """What the DPO family reads from a packed micro-batch of chosen and rejected answers: each sequence's summed
    log-probabilities and target count, as the padded batch gives them."""
    from honellm.training.logprobs import token_logprobs

    padded_model, model = load_fp32(arch_dir(arch), "sdpa"), load_fp32(arch_dir(arch), "sdpa")
    varlen.install(model)
    seqs = sequences((13, 7, 20, 11, 30, 4))
    with torch.no_grad():
        padded, packed = token_logprobs(padded_model, collate(seqs, 0)), token_logprobs(model, pack(seqs))
    assert packed.batch_size == len(seqs) and kernel
    torch.testing.assert_close(packed.per_sequence(), padded.per_sequence(), rtol=1e-5, atol=1e-5)
    assert packed.counts().tolist() == padded.counts().tolist()


# ------------------------------------------------------------ torch's own varlen_attn, its device part on a CPU
# The stand-in above follows the kernel's documented contract. Here torch's real `varlen_attn` runs instead: its
# argument handling (is_causal from the window bounds, grouped heads), its custom ops, their autograd and fake
# (tracing) registrations, with only the two CUDA computations given a CPU body (flash-attention's arithmetic per
# sequence, lse included), so what a GPU run calls is what runs here, eager and under torch.compile.


def _flash_math(query, key, value, cu, scale, is_causal, window_size, grad=None):
    """Per sequence, what flash-attention's varlen forward (out, lse) or backward (dq, dk, dv) computes."""
    left, right = list(window_size) if window_size is not None else [-1, -1]
    right = 0 if is_causal else right
    heads, kv_heads = query.shape[1], key.shape[1]
    groups = heads // kv_heads
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    out, lse = torch.empty_like(query), torch.empty(heads, query.shape[0])
    dq, dk, dv = torch.zeros_like(query), torch.zeros_like(k), torch.zeros_like(v)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q_, k_, v_ = (t[start:end].transpose(0, 1).float() for t in (query, k, v))
        i = torch.arange(end - start)
        allowed = torch.ones(end - start, end - start, dtype=torch.bool)
        if right >= 0:
            allowed &= i[None, :] <= i[:, None] + right
        if left >= 0:
            allowed &= i[:, None] - i[None, :] <= left
        scores = (q_ @ k_.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(-1)
        o = probs @ v_
        out[start:end], lse[:, start:end] = o.transpose(0, 1).to(out.dtype), scores.logsumexp(-1)
        if grad is not None:
            do = grad[start:end].transpose(0, 1).float()
            ds = probs * (do @ v_.transpose(1, 2) - (do * o).sum(-1, keepdim=True))
            dq[start:end] = (ds @ k_ * scale).transpose(0, 1).to(dq.dtype)
            dk[start:end] = (ds.transpose(1, 2) @ q_ * scale).transpose(0, 1).to(dk.dtype)
            dv[start:end] = (probs.transpose(1, 2) @ do).transpose(0, 1).to(dv.dtype)
    if grad is None:
        return out, lse, torch.zeros(2, dtype=torch.uint64)
    total = dk.shape[0]
    return dq, dk.view(total, kv_heads, groups, -1).sum(2), dv.view(total, kv_heads, groups, -1).sum(2)


@functools.cache
def _register_cpu_bodies() -> bool:
    try:
        from torch.nn.attention import varlen as torch_varlen

        forward, backward = torch_varlen._varlen_attn, torch_varlen._varlen_attn_backward
    except (ImportError, AttributeError):
        return False

    def forward_cpu(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None,
                    window_size=None, *unused):
        return _flash_math(query, key, value, cu_seq_q, scale, is_causal, window_size)

    def backward_cpu(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, rng_state,
                     scale=None, window_size=None):
        return _flash_math(query, key, value, cu_seq_q, scale, is_causal, window_size, grad=grad_out)

    forward.register_kernel("cpu")(forward_cpu)
    backward.register_kernel("cpu")(backward_cpu)
    return True


@pytest.fixture
def torch_kernel():
    """torch's `varlen_attn` as `support.varlen_kernel()` returns it, its two CUDA computations given CPU bodies."""
    if support.varlen_kernel() is None or not _register_cpu_bodies():
        pytest.skip("this torch has no torch.nn.attention.varlen custom ops (2.10+)")
    varlen._self_check.cache_clear()
    yield support.varlen_kernel()
    varlen._self_check.cache_clear()


def test_torchs_varlen_attn_through_hone_varlen_equals_per_sequence_attention(torch_kernel):
    g = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    inputs = [torch.randn(1, h, 20, 8, generator=g, requires_grad=True) for h in (4, 2, 2)]
    grad = torch.randn(1, 20, 4, 8, generator=g)
    for window in (None, 3):
        got = varlen.varlen(*inputs, cu, cu, 12, 12, scale=0.3, window=window)
        got_grads = torch.autograd.grad(got, inputs, grad)
        want = varlen.reference(*inputs, cu, scale=0.3, window=window)
        torch.testing.assert_close(got, want)
        for a, b in zip(got_grads, torch.autograd.grad(want, inputs, grad), strict=True):
            torch.testing.assert_close(a, b)
    assert varlen.self_check(CPU, torch.float32) is None
    assert varlen.self_check(CPU, torch.bfloat16, heads=6, kv_heads=2, head_dim=32, window=16) is None


@pytest.mark.parametrize(("arch", "checkpointing"), [("qwen2", False), ("mistral", True)])
def test_compiled_layers_take_torchs_varlen_attn_in_one_graph(arch_dir, arch, checkpointing, torch_kernel):
    """SFT's `compile=true` with packing on CUDA: the decoder layers compiled (dynamic shapes) around torch's
    kernel, with and without gradient checkpointing. Packed rows of other lengths and sequence counts reuse the one
    graph, with no graph break, and give padded sdpa's loss and gradients."""
    from torch._dynamo.utils import counters

    from honellm.training.setup import compile_layers

    torch._dynamo.reset()
    counters.clear()
    padded_model, model = load_fp32(arch_dir(arch), "sdpa"), load_fp32(arch_dir(arch), "sdpa")
    varlen.install(model)
    if checkpointing:
        enable_checkpointing(model)
    assert compile_layers(model) == model.config.num_hidden_layers
    for seed, lengths in enumerate([(13, 7, 20, 11), (9, 30, 5), (17, 17, 4, 8, 12)]):
        seqs = sequences(lengths, seed=seed + 1)
        assert_close(loss_and_grads(padded_model, collate(seqs, 0)), loss_and_grads(model, pack(seqs)))
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    torch._dynamo.reset()


def test_compiled_lora_layers_share_one_graph(arch_dir, torch_kernel):
    """With frozen embeddings (LoRA) the first layer's input needs no gradient and the others' do: dynamo compiled
    every layer twice over. `compile_layers` marks the embedding's output as needing one, so all layers share one
    graph, with the uncompiled model's loss and adapter gradients."""
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.utils import counters

    from honellm.training.setup import compile_layers

    def lora(model):
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; make the adapters do something
                torch.nn.init.normal_(param, std=0.05)
        return model

    torch._dynamo.reset()
    counters.clear()
    padded_model, model = lora(load_fp32(arch_dir("qwen2"), "sdpa")), lora(load_fp32(arch_dir("qwen2"), "sdpa"))
    varlen.install(model)
    assert not model.get_input_embeddings().weight.requires_grad
    assert compile_layers(model) == model.config.num_hidden_layers
    for seed, lengths in enumerate([(13, 7, 20, 11), (9, 30, 5)]):
        seqs = sequences(lengths, seed=seed + 1)
        expected, got = loss_and_grads(padded_model, collate(seqs, 0)), loss_and_grads(model, pack(seqs))
        assert got[1] and all("lora_" in name for name in got[1])  # the adapters' gradients alone
        assert_close(expected, got)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    with torch.no_grad():  # nothing is marked where no gradient is recorded
        assert not model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad
    torch._dynamo.reset()


# ------------------------------------------------------------ static packed rows (cuda_graphs=true)


def test_static_rows_keep_the_loss_and_the_shape(arch_dir, torch_kernel):
    """`pack(width=, slots=)`: every micro-batch the same shape (a filler sequence, empty sequences at the end),
    the same loss and gradients as padded; the layers compiled for CUDA graphs (`mode="reduce-overhead"`,
    static shapes; on a CPU the graphs themselves are skipped) trace once for rows of other contents."""
    from torch._dynamo.utils import counters

    from honellm.training.setup import compile_layers

    assert varlen.self_check(CPU, torch.float32, static=True) is None
    torch._dynamo.reset()
    counters.clear()
    padded_model, model = load_fp32(arch_dir("qwen2"), "sdpa"), load_fp32(arch_dir("qwen2"), "sdpa")
    varlen.install(model)
    assert compile_layers(model, mode="reduce-overhead", dynamic=False) == model.config.num_hidden_layers
    for seed, lengths in enumerate([(13, 7, 20, 11), (9, 30, 5), (40,)]):
        seqs = sequences(lengths, seed=seed + 1)
        batch = pack(seqs, width=64, slots=7, pad_id=3)
        assert batch.input_ids.shape == (1, 64) and batch.cu_seqlens.shape == (8,) and batch.max_seqlen == 64
        assert batch.num_tokens == sum(len(s) for s in seqs)
        assert_close(loss_and_grads(padded_model, collate(seqs, 0)), loss_and_grads(model, batch))
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    torch._dynamo.reset()


def test_cuda_graphs_say_what_they_need(arch_dir, monkeypatch):
    from honellm.errors import HoneError
    from honellm.tuning import sft
    from honellm.tuning.config import SFTConfig

    model, config = load_fp32(arch_dir("llama"), "sdpa"), SFTConfig(cuda_graphs=True)
    bf16 = torch.bfloat16

    def slots(device=CUDA, packing=True, attention=varlen.NAME, budget=512, why=None):
        return sft._cuda_graphs_slots(config, model, device, bf16, packing=packing, unpacked_because=why,
                                      attention=attention, budget=budget, longest=100, per_process=8)

    assert sft._cuda_graphs_slots(SFTConfig(), model, CUDA, bf16, packing=True, unpacked_because=None,
                                  attention="sdpa", budget=None, longest=1, per_process=8) is None
    with pytest.raises(HoneError, match="needs a CUDA GPU"):
        slots(device=CPU)
    with pytest.raises(HoneError, match="no varlen kernel here"):
        slots(packing=False, attention="sdpa", why="no varlen kernel here")
    with pytest.raises(HoneError, match="shorter than the longest"):
        slots(budget=64)
    monkeypatch.setattr(varlen, "usable", lambda *a, **k: "torch's varlen attention failed its self-check: x")
    with pytest.raises(HoneError, match="self-check"):
        slots()
    asked = []
    monkeypatch.setattr(varlen, "usable", lambda *a, **k: asked.append(k) or None)
    assert slots() == 9 and asked == [{"static": True}]  # a process's examples, and the filler
    assert slots(attention="flash_attention_2") == 9 and len(asked) == 1
