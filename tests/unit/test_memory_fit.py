"""The memory pre-flight fitted to the data and the machine: estimates from the micro-batches the data gives, a
smaller micro-batch (same global batch) or gradient checkpointing when the first choice does not fit, a refusal
only when nothing fits; the chunked LM head that keeps DPO's logits small; shapes for estimates without a model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from honellm.errors import HoneError
from honellm.models import load
from honellm.training import logprobs
from honellm.training.batching import IGNORE, LengthGroupedBatches, TokenSequence, collate
from honellm.training.memory import (
    GiB,
    ModelShape,
    estimate_for_shape,
    estimate_training_memory,
    fit_memory,
    micro_batch_shapes,
    parameter_bytes,
)
from honellm.training.setup import seed_everything
from honellm.tuning import get_method


@pytest.fixture
def lora_model(tiny_model_dir):
    seed_everything(0)
    model, _ = load(tiny_model_dir, dtype="fp32", device="cpu")
    spec = get_method("lora")
    return spec.apply(model, spec.config(), str(tiny_model_dir))


def _sampler(lengths, batch=8, accum=1):
    return LengthGroupedBatches(lengths, batch * accum, seed=0, slots=accum)


# ------------------------------------------------------------------------------------------------ data lengths


def test_shapes_come_from_the_data_after_length_grouping_not_from_max_length():
    lengths = [40] * 60 + [300] * 3 + [60] * 33  # one window: the three long ones land in one micro-batch
    losses = [5] * len(lengths)
    shapes = micro_batch_shapes(_sampler(lengths), loss_tokens=losses, grad_accum=1)
    assert max(s.length for s in shapes) == 300
    assert max(s.sequences for s in shapes) == 8
    assert max(s.loss_tokens for s in shapes) == 8 * 5
    pairs = micro_batch_shapes(_sampler(lengths), loss_tokens=losses, grad_accum=1, sequences_per_example=2,
                               max_length=256)
    assert max(s.length for s in pairs) == 256 and max(s.sequences for s in pairs) == 16
    assert max(s.loss_tokens for s in pairs) == 2 * 8 * 5
    # more accumulation: the same global batches in smaller micro-batches
    halves = micro_batch_shapes(_sampler(lengths, batch=4, accum=2), loss_tokens=losses, grad_accum=2)
    assert max(s.sequences for s in halves) == 4


def test_the_estimate_reads_the_data_lengths_where_max_length_is_far_longer(lora_model):
    lengths = [50 + i % 30 for i in range(64)]
    plan = fit_memory(lora_model, _sampler(lengths), loss_tokens=[10] * 64, batch_size=8, grad_accum=1,
                      gradient_checkpointing=False, device="cpu", capacity=64 * GiB)
    assert not plan.changed and plan.estimate.seq_len == max(lengths)
    assert plan.estimate.total == estimate_training_memory(lora_model, micro_batch_size=8, seq_len=max(lengths),
                                                           loss_tokens=80).total


# ------------------------------------------------------------------------------------------------ fitting


class _Config:
    """The three settings a plan changes, with pydantic's model_copy."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def model_copy(self, update):
        return _Config(**{**self.__dict__, **update})


def _estimates(model, lengths, losses, **kw):
    return {(b, ckpt): fit_memory(model, _sampler(lengths, b, 8 // b), loss_tokens=losses, batch_size=b,
                                  grad_accum=8 // b, gradient_checkpointing=ckpt, device="cpu", capacity=1 << 50,
                                  **kw).estimate.total
            for b in (8, 4, 2, 1) for ckpt in (False, True)}


def test_a_run_that_does_not_fit_takes_smaller_micro_batches_with_the_same_global_batch(lora_model, capsys):
    lengths, losses = [200 + i for i in range(64)], [20] * 64
    need = _estimates(lora_model, lengths, losses, attention="eager")
    assert need[8, False] > need[4, False] > need[2, False] > need[1, False]
    capacity = (need[4, False] + need[2, False]) // 2  # 2 per micro-batch fits, 4 does not
    plan = fit_memory(lora_model, _sampler(lengths), loss_tokens=losses, batch_size=8, grad_accum=1,
                      gradient_checkpointing=False, device="cpu", capacity=capacity, attention="eager")
    assert (plan.batch_size, plan.grad_accum, plan.gradient_checkpointing) == (2, 4, False)
    assert plan.changed and plan.estimate.total <= capacity < plan.first_choice.total
    assert "batch_size=2 grad_accum=4" in plan.note and "same global batch" in plan.note
    config = _Config(batch_size=8, grad_accum=1, gradient_checkpointing=False)
    fitted = plan.apply(config, lora_model, None)
    assert (fitted.batch_size, fitted.grad_accum, config.batch_size) == (2, 4, 8)


def test_gradient_checkpointing_when_no_micro_batch_fits_without_it(lora_model, tmp_path):
    lengths, losses = [200 + i for i in range(64)], [20] * 64
    need = _estimates(lora_model, lengths, losses, attention="eager")
    assert need[1, True] < need[1, False]
    capacity = (need[1, True] + need[1, False]) // 2
    plan = fit_memory(lora_model, _sampler(lengths), loss_tokens=losses, batch_size=8, grad_accum=1,
                      gradient_checkpointing=False, device="cpu", capacity=capacity, attention="eager")
    assert plan.gradient_checkpointing and plan.batch_size * plan.grad_accum == 8
    assert plan.estimate.total <= capacity
    bigger = [b for b in (8, 4, 2) if b > plan.batch_size]
    assert all(need[b, True] > capacity for b in bigger)  # the largest micro-batch that fits
    assert "gradient_checkpointing=true" in plan.note

    class Run:
        lines = []

        def log_metrics(self, **values):
            self.lines.append(values)

    fitted = plan.apply(_Config(batch_size=8, grad_accum=1, gradient_checkpointing=False), lora_model, Run())
    assert fitted.gradient_checkpointing and lora_model.get_base_model().model.gradient_checkpointing
    assert Run.lines[0]["event"] == "memory_fit" and Run.lines[0]["gradient_checkpointing"] is True


def test_it_refuses_only_when_nothing_fits(lora_model):
    lengths, losses = [200 + i for i in range(64)], [20] * 64
    need = _estimates(lora_model, lengths, losses)
    with pytest.raises(HoneError) as info:
        fit_memory(lora_model, _sampler(lengths), loss_tokens=losses, batch_size=8, grad_accum=1,
                   gradient_checkpointing=False, device="cpu", capacity=need[1, True] - 1)
    assert "even micro-batches of one example with gradient checkpointing" in info.value.what
    assert "max_length" in info.value.fix and "HONE_SKIP_MEMORY_CHECK" in info.value.fix
    assert info.value.where == "memory pre-flight"


def test_a_smaller_micro_batch_never_drops_a_global_batch(lora_model):
    # 12 examples, global batch 8: the second global batch has 4 examples, enough for 2 micro-batches of 2 but not
    # for 8 of 1; so micro-batches of 1 are skipped, and checkpointing is the next choice.
    lengths, losses = [200 + i for i in range(12)], [20] * 12
    sampler = _sampler(lengths)
    assert sampler.steps_per_epoch == 2
    need = _estimates(lora_model, [200 + i for i in range(64)], [20] * 64)
    plan = fit_memory(lora_model, sampler, loss_tokens=losses, batch_size=8, grad_accum=1,
                      gradient_checkpointing=False, device="cpu", capacity=need[2, False] - 1)
    assert plan.batch_size != 1 or plan.gradient_checkpointing


def test_skip_check_keeps_the_settings(lora_model, monkeypatch):
    monkeypatch.setenv("HONE_SKIP_MEMORY_CHECK", "1")
    plan = fit_memory(lora_model, _sampler([300] * 16), loss_tokens=[20] * 16, batch_size=8, grad_accum=1,
                      gradient_checkpointing=False, device="cpu", capacity=1)
    assert not plan.changed and plan.batch_size == 8


# ------------------------------------------------------------------------------------------------ chunked head


def _batch(vocab, rows=4, width=24, answer=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    sequences = []
    for row in range(rows):
        n = width - row
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        sequences.append(TokenSequence(ids, [IGNORE] * (n - answer) + ids[-answer:]))
    return collate(sequences, 0)


@pytest.mark.parametrize("fast", ["1", "0"])
@pytest.mark.parametrize("entropy", [False, True])
def test_the_chunked_head_gives_the_same_log_probs_and_gradients(lora_model, monkeypatch, fast, entropy):
    monkeypatch.setenv("HONE_FAST_FORWARD", fast)
    lora_model.get_base_model().set_attn_implementation("eager")
    batch = _batch(lora_model.config.vocab_size)
    results = []
    for chunk in (10_000, 7):  # one piece (the old path), then pieces of 7 of the 40 targets
        monkeypatch.setattr(logprobs, "LOGIT_CHUNK", chunk)
        lora_model.zero_grad()
        found = logprobs.token_logprobs(lora_model, batch, with_entropy=entropy)
        total = found.values.sum() + (found.entropy.sum() if entropy else 0)
        total.backward()
        grads = [p.grad.clone() for p in lora_model.parameters() if p.requires_grad]
        results.append((found, grads))
    (a, grads_a), (b, grads_b) = results
    assert a.values.shape == (40,)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-6)
    if entropy:
        torch.testing.assert_close(a.entropy, b.entropy, rtol=0, atol=1e-5)
    for x, y in zip(grads_a, grads_b, strict=True):  # fp32 sums in another order (chunks): ~5e-7 on some CPUs
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_a_model_that_transforms_its_logits_keeps_the_model_s_own_head():
    base = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2)
    assert logprobs._plain_head(LlamaForCausalLM(base))
    capped = LlamaConfig(**{**base.to_dict(), "final_logit_softcapping": 30.0})
    assert not logprobs._plain_head(LlamaForCausalLM(capped))


# ------------------------------------------------------------------------------------------------ shapes


def test_a_shape_counts_parameters_and_lora_parameters_like_the_model(tiny_model_dir):
    model, _ = load(tiny_model_dir, dtype="fp32", device="cpu")
    shape = ModelShape.of(model.config)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert shape.parameters() == sum(p.numel() for p in model.parameters()) - norms
    spec = get_method("lora")
    lora = spec.apply(model, spec.config(r=4), str(tiny_model_dir))
    assert shape.lora_parameters(4) == parameter_bytes(lora)[1]
    assert ModelShape.of(model.config.to_dict()) == shape  # a config.json read as a dict


def test_the_shape_estimate_equals_the_model_estimate(lora_model):
    stored, trainable, _ = parameter_bytes(lora_model)
    kw = {"micro_batch_size": 8, "seq_len": 100, "loss_tokens": 16, "attention": "eager"}
    assert estimate_for_shape(ModelShape.of(lora_model.config), stored_bytes=stored, trainable=trainable, **kw) \
        == estimate_training_memory(lora_model, **kw)


# ------------------------------------------------------------------------------------------------ in the recipes


def _one_gib_per_sequence(monkeypatch):
    """An estimate of 1 GiB per sequence of a micro-batch, so that memory_limit_gb picks the micro-batch."""
    from honellm.training import memory

    real = memory.estimate_training_memory

    def fake(model, *, micro_batch_size, **kw):
        found = real(model, micro_batch_size=micro_batch_size, **kw)
        return memory.MemoryEstimate(0, 0, 0, micro_batch_size * GiB, 0, 0, micro_batch_size, found.seq_len,
                                     found.gradient_checkpointing)

    monkeypatch.setattr(memory, "estimate_training_memory", fake)


@pytest.mark.parametrize("method", ["dpo", "reward_model"])
def test_an_align_run_that_does_not_fit_trains_with_smaller_micro_batches(tiny_model_dir, tmp_path, monkeypatch,
                                                                          method, capsys):
    from honellm.reward.recipes import align_task
    from honellm.runs import read_metrics
    from honellm.testing import make_tiny_preference_task

    _one_gib_per_sequence(monkeypatch)
    monkeypatch.delenv("HONE_QUIET", raising=False)
    task_yaml = make_tiny_preference_task(tmp_path / "prefs", tiny_model_dir)
    out = tmp_path / "run"
    # 4 pairs = 8 sequences = 8 GiB > 5: micro-batches of 2 pairs (4 GiB), grad_accum 2, the same global batch
    artifact = align_task(str(task_yaml), method, ["max_steps=1", "batch_size=4", "eval_every=0", "r=4",
                                                   "memory_limit_gb=5"], out=str(out))
    fit = next(r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "memory_fit")
    assert (fit["batch_size"], fit["grad_accum"]) == (2, 2)
    start = next(r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "start")
    assert start["estimated_peak_memory_bytes"] == 4 * GiB
    assert (artifact.manifest.config["batch_size"], artifact.manifest.config["grad_accum"]) == (2, 2)
    assert "hone: memory: batch_size=4 grad_accum=1 would need about 8.00 GiB" in capsys.readouterr().err


def test_an_sft_run_refuses_when_not_even_one_example_fits(tiny_model_dir, tmp_path, monkeypatch):
    from honellm.task import Task
    from honellm.testing import make_tiny_task
    from honellm.tuning.sft import tune

    _one_gib_per_sequence(monkeypatch)
    task = Task.load(make_tiny_task(tmp_path / "t", tiny_model_dir))
    config = get_method("lora").config(max_steps=1, batch_size=4, eval_every=0, r=4, memory_limit_gb=0.5)
    with pytest.raises(HoneError) as info:
        tune(task, "lora", config, out=tmp_path / "run")
    assert "even micro-batches of one example" in info.value.what


def test_peak_memory_is_the_programs_own_not_its_parents_at_the_fork():
    """A run started by a large process (CI's test runner) reports its own peak: Linux carries `ru_maxrss` over
    `execve`, so the parent's size at the fork would read as the child's peak."""
    import subprocess
    import sys

    from honellm.hardware import peak_rss_bytes

    ballast = bytearray(512 * 2**20)
    ballast[:: 4096] = b"\1" * (len(ballast) // 4096)  # touch every page: 512 MiB resident here
    assert peak_rss_bytes() >= 512 * 2**20
    code = "from honellm.hardware import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    del ballast
    assert 0 < child < 512 * 2**20  # importing torch and Hone: a few hundred MiB
