"""The shared training components one by one: masking, batching, schedule, the train step, checkpoints, memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from honellm.errors import HoneError
from honellm.models import load
from honellm.training.batching import IGNORE, LengthGroupedBatches, collate, encode_conversation
from honellm.training.checkpoint import Checkpointer
from honellm.training.logprobs import LossOutput, sft_loss
from honellm.training.memory import GiB, check_memory, estimate_training_memory
from honellm.training.optim import build_optimizer, build_schedule, lr_multiplier
from honellm.training.precision import Precision
from honellm.training.setup import seed_everything, setup_accelerator
from honellm.training.step import NonFiniteLoss, TrainStep
from honellm.tuning import get_method

FP32 = Precision(torch.float32, "cpu")


@pytest.fixture
def lora_model(tiny_model_dir):
    seed_everything(0)
    model, tokenizer = load(tiny_model_dir, dtype="fp32", device="cpu")
    spec = get_method("lora")
    return spec.apply(model, spec.config(), str(tiny_model_dir)), tokenizer


# ------------------------------------------------------------------------------------------------ masking


def test_completion_only_masks_the_prompt_and_keeps_the_end_of_turn(tiny_model):
    _, tokenizer = tiny_model
    messages = [{"role": "system", "content": "Classify."}, {"role": "user", "content": "Review: a warm film"}]
    seq = encode_conversation(tokenizer, messages, "positive", max_length=256)
    answer = [t for t, label in zip(seq.input_ids, seq.labels, strict=True) if label != IGNORE]
    assert tokenizer.decode(answer) == "positive<|im_end|>"
    prompt = tokenizer.decode(seq.input_ids[: len(seq) - len(answer)])
    assert prompt.endswith("<|im_start|>assistant\n") and "Classify." in prompt
    assert seq.labels[: len(seq) - len(answer)] == [IGNORE] * (len(seq) - len(answer))
    full = encode_conversation(tokenizer, messages, "positive", max_length=256, completion_only=False)
    assert full.input_ids == seq.input_ids and full.labels == full.input_ids


def test_truncation_keeps_the_answer_and_drops_the_start_of_the_prompt(tiny_model):
    _, tokenizer = tiny_model
    messages = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6}]
    whole = encode_conversation(tokenizer, messages, "positive", max_length=4096)
    cut = encode_conversation(tokenizer, messages, "positive", max_length=20)
    assert len(cut) == 20 and cut.truncated and not whole.truncated
    assert cut.input_ids == whole.input_ids[-20:] and cut.num_loss_tokens == whole.num_loss_tokens


def test_collate_pads_right_and_counts_real_and_loss_tokens(tiny_model):
    _, tokenizer = tiny_model
    seqs = [encode_conversation(tokenizer, [{"role": "user", "content": t}], "yes", max_length=64) for t in ("a", "a b c d")]
    batch = collate(seqs, tokenizer.pad_token_id)
    assert batch.input_ids.shape == (2, max(len(s) for s in seqs))
    assert batch.num_tokens == sum(len(s) for s in seqs) == int(batch.attention_mask.sum())
    assert batch.num_loss_tokens == sum(s.num_loss_tokens for s in seqs)
    assert (batch.labels[batch.attention_mask == 0] == IGNORE).all()


# ------------------------------------------------------------------------------------------------ batching


def test_length_grouped_batches_are_seeded_complete_and_little_padded():
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 300, size=203).tolist()
    sampler = LengthGroupedBatches(lengths, 8, seed=3, slots=2)
    again = LengthGroupedBatches(lengths, 8, seed=3, slots=2)
    other = LengthGroupedBatches(lengths, 8, seed=4, slots=2)
    epoch0 = [b.tolist() for b in sampler.epoch_batches(0)]
    assert epoch0 == [b.tolist() for b in again.epoch_batches(0)]
    assert epoch0 != [b.tolist() for b in other.epoch_batches(0)]
    assert epoch0 != [b.tolist() for b in sampler.epoch_batches(1)]
    seen = sorted(i for b in epoch0 for i in b)
    assert len(seen) == len(set(seen)) and len(seen) >= 203 - 7  # at most one short batch is dropped
    assert sampler.steps_per_epoch == len(epoch0) == len(sampler.epoch_batches(5))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in epoch0)
    assert sum(lengths[i] for i in seen) / padded > 0.9  # random batches of these lengths would be ~0.6


def test_one_process_with_accumulation_and_two_processes_get_the_same_micro_batches():
    lengths = list(range(5, 69))
    sampler = LengthGroupedBatches(lengths, 8, seed=0, slots=2)
    for step in range(3):
        single = sampler.micro_batches(step, grad_accum=2)
        ranks = [sampler.micro_batches(step, rank=r, world_size=2) for r in (0, 1)]
        assert [m.tolist() for m in single] == [ranks[0][0].tolist(), ranks[1][0].tolist()]
        assert sorted(i for m in single for i in m) == sorted(sampler.global_batch(step).tolist())


# ------------------------------------------------------------------------------------------------ schedule


def test_schedule_warms_up_then_decays():
    kw = {"total_steps": 100, "warmup_steps": 10}
    assert lr_multiplier(0, **kw) == pytest.approx(1 / 11)
    assert lr_multiplier(9, **kw) == pytest.approx(10 / 11)
    assert lr_multiplier(10, **kw) == pytest.approx(1.0)
    assert lr_multiplier(55, **kw) == pytest.approx(0.5)
    assert lr_multiplier(100, **kw) == pytest.approx(0.0)
    assert lr_multiplier(55, **kw, schedule="linear") == pytest.approx(0.5)
    assert lr_multiplier(100, **kw, schedule="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(80, **kw, schedule="constant") == 1.0


def test_weight_decay_only_on_matrices(lora_model):
    model, _ = lora_model
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed = [g for g in optimizer.param_groups if g["weight_decay"] > 0]
    assert decayed and all(p.ndim >= 2 for g in decayed for p in g["params"])


# ------------------------------------------------------------------------------------------------ train step


def _step(model, lr=1e-3):
    optimizer = build_optimizer(model, lr=lr)
    schedule = build_schedule(optimizer, total_steps=10, warmup_steps=0, schedule="constant")
    return TrainStep(setup_accelerator(), model, optimizer, schedule, precision=FP32, max_grad_norm=None)


def _seqs(tokenizer):
    texts = ["a warm film", "dull and far too long, really far too long", "funny", "the quick brown fox jumps"]
    answers = ["positive", "negative and long", "positive", "neutral, mostly"]
    return [encode_conversation(tokenizer, [{"role": "user", "content": t}], a, max_length=64)
            for t, a in zip(texts, answers, strict=True)]


def test_accumulation_weights_micro_batches_by_their_tokens(tiny_model_dir):
    results = []
    for split in ([4], [2, 2], [1, 3]):
        seed_everything(0)
        model, tokenizer = load(tiny_model_dir, dtype="fp32", device="cpu")
        for p in model.parameters():
            p.requires_grad_(p.ndim == 2)
        seqs = _seqs(tokenizer)
        micro, start = [], 0
        for n in split:
            micro.append(collate(seqs[start:start + n], tokenizer.pad_token_id))
            start += n
        result = _step(model)(micro, sft_loss)
        results.append((result.loss, result.units, result.tokens,
                        torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])))
    for loss, units, tokens, weights in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        assert (units, tokens) == results[0][1:3]
        # Adam divides by sqrt(v): a near-zero gradient turns float noise into weight noise (up to ~2.5e-6 seen on
        # an AMD EPYC's fp32 kernels); updates are ~1e-3
        torch.testing.assert_close(weights, results[0][3], rtol=1e-5, atol=1e-5)


def test_non_finite_loss_stops_without_touching_the_weights(lora_model):
    model, tokenizer = lora_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = collate(_seqs(tokenizer), tokenizer.pad_token_id)

    def nan_loss(m, b):
        out = sft_loss(m, b)
        return LossOutput(out.total * float("nan"), out.count)

    with pytest.raises(NonFiniteLoss, match="became nan at step 7") as info:
        _step(model)([batch], nan_loss, step=6)
    assert "lower lr" in info.value.fix and "--resume" in info.value.fix
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None


def test_a_cpu_step_trims_the_heap_before_each_micro_batch_larger_than_any_before(lora_model, monkeypatch):
    """Before a micro-batch larger than any before it, with the earlier ones' tensors gone, the step trims glibc's
    heap (over a run whose micro-batches change shape the freed holes would otherwise stay resident and the larger
    batch extend the heap; honellm.training.step); not before a micro-batch no larger than one already seen."""
    import weakref

    from honellm.training import step as step_module

    model, tokenizer = lora_model
    seqs = _seqs(tokenizer)
    alive, calls = [], []

    def loss_fn(m, b):
        out = sft_loss(m, b)
        alive.append(weakref.ref(out.total))
        return out

    def trim():
        calls.append([ref() is None for ref in alive])
        return True

    monkeypatch.setattr(step_module, "release_freed_memory", trim)
    small, large = collate(seqs[:1], tokenizer.pad_token_id), collate(seqs[1:], tokenizer.pad_token_id)
    assert large.input_ids.numel() > small.input_ids.numel()
    step = _step(model)
    step([small, large, small], loss_fn)
    assert calls == [[], [True]]  # before the first, and before the larger one with the first one's graph freed
    step([large, small], loss_fn)
    assert len(calls) == 2  # nothing larger than before: no trim


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_keeps_last_k_and_ignores_partial_writes(lora_model, tmp_path):
    model, tokenizer = lora_model
    step = _step(model)
    batch = collate(_seqs(tokenizer), tokenizer.pad_token_id)
    ckpt = Checkpointer(tmp_path / "ck", keep=2)
    for i in range(1, 4):
        step([batch], sft_loss)
        ckpt.save(i, model=model, optimizer=step.optimizer, schedule=step.schedule, state={"best": i})
    assert [s for s, _ in ckpt.steps()] == [2, 3]
    (tmp_path / "ck" / ".step-000004.tmp").mkdir()  # a write killed half-way
    (tmp_path / "ck" / "step-000009").mkdir()  # no state.json: never completed
    assert ckpt.latest().name == "step-000003"

    torch.manual_seed(123)
    expected_rng = torch.rand(3)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    ckpt.save(4, model=model, optimizer=step.optimizer, schedule=step.schedule, state={"best": 4})
    torch.manual_seed(123)
    _ = torch.rand(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    fresh = _step(model)
    state = ckpt.restore(ckpt.latest(), model=model, optimizer=fresh.optimizer, schedule=fresh.schedule)
    assert state == {"step": 4, "best": 4}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, saved[name])
    torch.manual_seed(0)
    assert not torch.equal(torch.rand(3), expected_rng)  # sanity: the RNG really moved
    assert fresh.optimizer.state_dict()["state"].keys() == step.optimizer.state_dict()["state"].keys()


# ------------------------------------------------------------------------------------------------ memory


def test_memory_estimate_grows_with_batch_length_and_trainable_weights(lora_model, tiny_model_dir):
    model, _ = lora_model
    base = estimate_training_memory(model, micro_batch_size=4, seq_len=128)
    assert estimate_training_memory(model, micro_batch_size=8, seq_len=128).activations == 2 * base.activations
    assert estimate_training_memory(model, micro_batch_size=4, seq_len=256).activations == 2 * base.activations
    eager = estimate_training_memory(model, micro_batch_size=4, seq_len=128, attention="eager")
    assert estimate_training_memory(model, micro_batch_size=4, seq_len=256, attention="eager").activations \
        > 2 * eager.activations > 2 * base.activations  # eager attention keeps seq x seq scores
    assert estimate_training_memory(model, micro_batch_size=4, seq_len=128, gradient_checkpointing=True).activations \
        < base.activations
    full, _ = load(tiny_model_dir, dtype="fp32", device="cpu")
    full_estimate = estimate_training_memory(full.train(), micro_batch_size=4, seq_len=128)
    n_full = sum(p.numel() for p in full.parameters())
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (full_estimate.optimizer, base.optimizer) == (8 * n_full, 8 * n_lora)  # AdamW: two fp32 moments


def test_memory_preflight_refuses_and_says_what_to_change(lora_model):
    model, _ = lora_model

    def estimate_for(batch, length, checkpointing):
        return estimate_training_memory(model, micro_batch_size=batch, seq_len=length,
                                        gradient_checkpointing=checkpointing)

    fits = check_memory(estimate_for, batch_size=8, seq_len=512, grad_accum=1, gradient_checkpointing=False,
                        device="cpu")
    assert fits.total < 4 * GiB
    limit = (estimate_for(1, 4096, False).total + estimate_for(64, 4096, False).total) / 2 / GiB
    with pytest.raises(HoneError) as info:
        check_memory(estimate_for, batch_size=64, seq_len=4096, grad_accum=2, gradient_checkpointing=False,
                     device="cpu", limit_gb=limit)
    assert "more than the memory limit" in info.value.what
    assert "batch_size=" in info.value.fix and "grad_accum=" in info.value.fix
    fix_batch = int(info.value.fix.split("batch_size=")[1].split()[0])
    fix_accum = int(info.value.fix.split("grad_accum=")[1].split()[0])
    assert fix_batch * fix_accum == 64 * 2
    assert math.isfinite(limit)
