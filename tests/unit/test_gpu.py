"""The GPU paths against their exact references, on a CUDA device only (skipped elsewhere; on a GPU machine
`pytest -m gpu`, which `bench/gpu_run.sh` runs before the benchmark): Liger Kernel's real Triton kernels and
fused linear cross-entropy (tests/unit/test_core_liger.py checks the wiring on a CPU with a fake Liger), packing
under the GPU's attention kernels (test_packing.py checks it on a CPU), and the SFT recipe's GPU defaults.

Tolerances are looser than the CPU tests' fp32 1e-5: CUDA's matrix products reduce in another order (and TF32 is
off here, so that is all they differ by)."""

from __future__ import annotations

import pytest
import torch

from honellm.core import liger, varlen
from honellm.core.support import (
    kernel_parameters,
    liger_problem,
    packing_problem,
    varlen_kernel,
    varlen_problem,
)
from honellm.training.batching import IGNORE, TokenSequence, collate, pack
from honellm.training.logprobs import token_logprobs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def sequences(lengths=(40, 23, 57, 31)):
    g = torch.Generator().manual_seed(5)
    out = []
    for n in lengths:
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        out.append(TokenSequence(ids, [IGNORE] * (n // 3) + ids[n // 3:]))
    return out


def lora_model(path, attention="sdpa"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model.to(CUDA).train()


def weighted_grads(model, batch, weights=None):
    """Token log-probs and the gradients of a sum weighted unequally, with mixed signs (DPO's chosen and rejected,
    RL's advantages): a fused loss that scaled every row by one upstream value would pass a plain sum."""
    model.zero_grad(set_to_none=True)
    found = token_logprobs(model, batch)
    if weights is None:
        weights = torch.linspace(-1.5, 2.0, found.values.numel(), device=found.values.device)
    (found.values * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return found.values.detach(), grads, weights


def assert_close(a, b, tolerance):
    (values_a, grads_a, _), (values_b, grads_b, _) = a, b
    assert torch.allclose(values_a, values_b, atol=tolerance, rtol=tolerance)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert float((grad - grads_b[name]).abs().max() / scale) <= tolerance, name


def test_liger_kernels_and_fused_loss_equal_the_logits_path(arch_dir):
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (pip install 'honellm[gpu]')")
    path = arch_dir("llama")
    plain = lora_model(path)
    assert liger_problem(plain, CUDA) is None
    for make in (lambda s: collate(s, 0), pack):
        batch = make(sequences()).to(CUDA)
        expected = weighted_grads(plain, batch)
        fused = lora_model(path)
        fused.load_state_dict(plain.state_dict())
        assert liger.apply(fused, CUDA) is None and liger.active(fused)
        found = weighted_grads(fused, batch, expected[2])
        assert_close(found, expected, 2e-4)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flash_attention_2", varlen.NAME])
@pytest.mark.parametrize("arch", ["qwen2", "mistral"])  # mistral: 8-token windows, shorter than the sequences
def test_packed_batches_equal_padded_ones_on_cuda(arch_dir, arch, attention):
    if attention == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    from transformers import AutoModelForCausalLM

    path = arch_dir(arch)
    flash = attention in ("flash_attention_2", varlen.NAME)
    dtype = torch.bfloat16 if flash else torch.float32  # flash kernels take bf16/fp16
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa" if attention == varlen.NAME
                                                 else attention, dtype=dtype).to(CUDA)
    padded = weighted_grads(model, collate(sequences(), 0).to(CUDA))  # sdpa for hone_varlen's model
    if attention == varlen.NAME:
        problem = varlen.usable(model, CUDA, dtype)
        if problem is not None:
            pytest.skip(problem)
        varlen.install(model)
    assert packing_problem(model) is None
    packed = weighted_grads(model, pack(sequences()).to(CUDA), padded[2])
    assert_close(packed, padded, 2e-4 if dtype == torch.float32 else 3e-2)
    with torch.no_grad():  # what the DPO family reads from a packed micro-batch: each sequence's own sum
        sums = [token_logprobs(model, b.to(CUDA)).per_sequence() for b in (collate(sequences(), 0), pack(sequences()))]
    assert sums[1].shape == (len(sequences()),)
    torch.testing.assert_close(sums[1], sums[0], rtol=3e-2, atol=3e-2 * float(sums[0].abs().max()))


def test_torch_varlen_kernel_passes_its_self_check():
    if varlen_problem(None, CUDA, torch.bfloat16) is not None:
        pytest.skip(varlen_problem(None, CUDA, torch.bfloat16))
    for dtype in (torch.bfloat16, torch.float16):
        assert varlen.self_check(CUDA, dtype) is None
        assert varlen.self_check(CUDA, dtype, heads=32, kv_heads=8, head_dim=128) is None  # Llama-3-8B's heads
    if "window_size" in kernel_parameters(varlen_kernel()):
        assert varlen.self_check(CUDA, torch.bfloat16, heads=8, kv_heads=2, head_dim=64, window=16) is None


def test_sft_on_cuda_trains_with_its_gpu_defaults(tiny_model_dir, tmp_path):
    import importlib.util

    from transformers import AutoConfig

    from honellm.runs import read_metrics
    from honellm.testing import make_tiny_task
    from honellm.tuning import tune_task

    task_yaml = make_tiny_task(tmp_path / "task", tiny_model_dir)
    tune_task(str(task_yaml), "lora", ["max_steps=4", "eval_every=0", "save_every=0", "batch_size=4", "r=4"],
              out=str(tmp_path / "run"))
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    start = next(r for r in metrics if r.get("event") == "start")
    losses = [r["loss"] for r in metrics if "loss" in r]
    assert start["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    if importlib.util.find_spec("flash_attn") is not None:  # packed by a token budget, on the varlen kernel
        assert start["packing"] is True and start["max_tokens_per_batch"] and start["attention"] == "flash_attention_2"
    elif start["precision"] == "bf16" and varlen.usable(AutoConfig.from_pretrained(tiny_model_dir), CUDA,
                                                        torch.bfloat16) is None:  # PyTorch's own varlen kernel
        assert start["packing"] is True and start["max_tokens_per_batch"] and start["attention"] == varlen.NAME
    else:
        assert start["packing"] is False and start["attention"] == "sdpa"
    if importlib.util.find_spec("liger_kernel") is not None:
        assert start["liger"] == "applied"
    assert len(losses) == 4 and all(loss == loss and loss < 20 for loss in losses)  # finite, not diverged


def test_decoding_steps_replay_as_cuda_graphs_with_the_eager_tokens(tiny_model_dir, monkeypatch):
    """The engine records a batch's decoding step as a CUDA graph and replays it (`DecodeGraph`): the tokens of
    eager decoding (HONE_CUDA_GRAPHS=0), greedy and sampled, the recording's self-check passed."""
    from honellm.generation import Generator, SamplingParams
    from honellm.models import load

    model, tok = load(tiny_model_dir, dtype="fp32", device="cuda")
    generator = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():  # weights with some spread: varied outputs (the tiny model at its init repeats a token)
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("hi", "What is 2 + 3?", "a gripping, funny and warm film", "how do I bake bread?")]
    graphed = Generator(model, tok, batch_size=4)
    assert graphed._cuda_graphs
    monkeypatch.setenv("HONE_CUDA_GRAPHS", "0")
    eager = Generator(model, tok, batch_size=4)
    assert not eager._cuda_graphs
    for params in (SamplingParams(max_new_tokens=24), SamplingParams(max_new_tokens=24, temperature=0.8, seed=3)):
        got, want = graphed.generate(prompts, params), eager.generate(prompts, params)
        assert graphed._runner.graphs_problem is None
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert len({tuple(o.token_ids) for o in got}) > 1


def test_a_training_lora_policy_decodes_merged_on_cuda_with_its_layers_tokens(tiny_model_dir, monkeypatch):
    """On a GPU the engine merges a LoRA policy into its derived weights (where they fit) and gives them back after
    the call while the policy trains: the greedy tokens of decoding through the LoRA layers themselves."""
    from peft import LoraConfig, get_peft_model

    from honellm.core import fused, runners
    from honellm.generation import Generator, SamplingParams
    from honellm.models import load

    model, tok = load(tiny_model_dir, dtype="fp32", device="cuda")
    generator = torch.Generator(device="cpu").manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    policy = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    fused.install(policy)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("hi", "What is 2 + 3?", "a gripping, funny and warm film")]
    params = SamplingParams(max_new_tokens=20)
    merged = Generator(policy, tok, batch_size=3)
    got = [o.token_ids for o in merged.generate(prompts, params)]
    assert merged._runner.derived.enabled and merged._runner.derived.layers is None  # built, then given back
    monkeypatch.setattr(runners, "DERIVED_GPU_SHARE", 0.0)  # nothing fits: the LoRA layers run
    layers = Generator(policy, tok, batch_size=3)
    assert [o.token_ids for o in layers.generate(prompts, params)] == got and len({tuple(t) for t in got}) > 1


def _sft_losses(task_yaml, out, *settings) -> tuple[dict, list[float]]:
    from honellm.runs import read_metrics
    from honellm.tuning import tune_task

    tune_task(str(task_yaml), "lora", ["max_steps=4", "eval_every=0", "save_every=0", "batch_size=4", "r=4", "seed=0",
                                       *settings], out=str(out))
    metrics = read_metrics(out / "metrics.jsonl")
    return next(r for r in metrics if r.get("event") == "start"), [r["loss"] for r in metrics if "loss" in r]


def _skip_unless_lever_runs(lever: str, model_dir) -> None:
    """Packing on a varlen kernel needs bf16 here, and cuda_graphs=true a varlen kernel passing its self-check."""
    from transformers import AutoConfig

    if not torch.cuda.is_bf16_supported():
        pytest.skip("packing on a varlen kernel needs bf16 here")
    if lever.startswith("cuda_graphs") and varlen.usable(AutoConfig.from_pretrained(model_dir), CUDA,
                                                         torch.bfloat16) is not None:
        pytest.skip("cuda_graphs=true needs a varlen kernel that passes its self-check")


# Each compiles (Inductor): marked slow, bench/gpu_run.sh runs them in the call that measures these levers
# (--compile / --cuda-graphs), before the benchmark.
@pytest.mark.slow
@pytest.mark.parametrize("lever", ["compile=true", "cuda_graphs=true"])
def test_sft_compiled_and_cuda_graphs_train_to_the_eager_runs_losses(tiny_model_dir, tmp_path, lever):
    """`compile=true` (layers compiled, dynamic shapes) and `cuda_graphs=true` (static packed rows replayed as CUDA
    graphs, gradients copied out of the graph pool) give the eager packed run's losses, step by step (bf16: the
    compiled kernels round in another order)."""
    from honellm.testing import make_tiny_task

    _skip_unless_lever_runs(lever, tiny_model_dir)
    task_yaml = make_tiny_task(tmp_path / "task", tiny_model_dir)
    _, eager = _sft_losses(task_yaml, tmp_path / "eager", "packing=true")
    start, levered = _sft_losses(task_yaml, tmp_path / "levered", "packing=true", lever)
    if lever.startswith("cuda_graphs"):
        assert start["cuda_graphs"]
    assert len(levered) == len(eager) == 4 and all(loss == loss for loss in levered)
    for got, want in zip(levered, eager, strict=True):
        assert got == pytest.approx(want, rel=3e-2, abs=3e-2)


@pytest.mark.slow
@pytest.mark.parametrize("lever", ["compile=true", "cuda_graphs=true"])
def test_dpo_compiled_and_cuda_graphs_train_to_the_eager_runs_losses(tiny_model_dir, tmp_path, lever):
    """The DPO family's levers on a GPU: the same losses as the eager packed run, step by step (bf16 tolerance);
    under CUDA graphs every micro-batch is one static row as wide as the run's widest."""
    from honellm.reward.recipes import align_task
    from honellm.runs import read_metrics
    from honellm.testing import make_tiny_preference_task

    _skip_unless_lever_runs(lever, tiny_model_dir)
    task_yaml = make_tiny_preference_task(tmp_path / "task", tiny_model_dir)
    args = ["max_steps=4", "eval_every=1", "save_every=0", "batch_size=2", "grad_accum=2", "r=4", "lr=1e-3",
            "packing=true"]
    found = {}
    for name, extra in (("eager", []), ("levered", [lever])):
        align_task(str(task_yaml), "dpo", [*args, *extra], out=str(tmp_path / name))
        rows = read_metrics(tmp_path / name / "metrics.jsonl")
        found[name] = (next(r for r in rows if r.get("event") == "start"), [r["loss"] for r in rows if "loss" in r])
    start, levered = found["levered"]
    assert start["cuda_graphs"] is lever.startswith("cuda_graphs")
    eager = found["eager"][1]
    assert len(levered) == len(eager) == 4 and all(loss == loss for loss in levered)
    for got, want in zip(levered, eager, strict=True):
        assert got == pytest.approx(want, rel=3e-2, abs=3e-2)


@pytest.mark.slow
def test_grpo_updates_on_cuda_graphs_take_the_eager_runs_first_step(tiny_model_dir, tmp_path):
    """GRPO's updates replayed as CUDA graphs (static packed rows): the first step's rollouts are the eager run's
    (the same seed, the policy not yet updated), so its reward equals it and its loss agrees (bf16 tolerance)."""
    from honellm.reward.recipes.grpo import GRPOConfig, grpo
    from honellm.runs import read_metrics
    from honellm.task import Task
    from honellm.testing import make_tiny_reward_task

    _skip_unless_lever_runs("cuda_graphs=true", tiny_model_dir)
    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir))
    settings = dict(max_steps=2, prompts_per_step=2, group_size=4, batch_size=4, guard_prompts=4, r=4,
                    max_new_tokens=8, eval_every=1, lr=1e-3, kl_coef=0.1, dynamic_sampling=False, packing=True)
    found = {}
    for name, extra in (("eager", {}), ("graphs", {"cuda_graphs": True})):
        grpo(task, GRPOConfig(**settings, **extra), out=tmp_path / name)
        rows = read_metrics(tmp_path / name / "metrics.jsonl")
        found[name] = [r for r in rows if r.get("kind") == "train"]
        assert next(r for r in rows if r.get("event") == "start")["cuda_graphs"] is bool(extra)
    eager, graphs = found["eager"], found["graphs"]
    assert len(graphs) == len(eager) == 2 and all(r["loss"] == r["loss"] for r in graphs)
    assert graphs[0]["reward"] == eager[0]["reward"]
    assert graphs[0]["loss"] == pytest.approx(eager[0]["loss"], rel=3e-2, abs=3e-2)
