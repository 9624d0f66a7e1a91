"""The sparse-logit loss (LM head at answer positions only) equals the textbook full-logit loss, values and
gradients, for a plain model and for PEFT models that shift (prompt tuning) or extend (prefix tuning) the input."""

from __future__ import annotations

import pytest
import torch

from honellm.models import load
from honellm.training.batching import IGNORE, collate, encode_conversation
from honellm.training.logprobs import (
    full_logits_nll,
    predicting_positions,
    sequence_logprobs,
    sft_loss,
    token_logprobs,
)
from honellm.training.precision import Precision
from honellm.training.setup import seed_everything
from honellm.tuning import get_method


def _batch(tokenizer, completion_only=True):
    convs = [([{"role": "system", "content": "Classify."}, {"role": "user", "content": "a warm, funny film"}], "positive"),
             ([{"role": "user", "content": "dull"}], "negative, and far too long"),
             ([{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}], "neutral")]
    seqs = [encode_conversation(tokenizer, m, a, max_length=128, completion_only=completion_only) for m, a in convs]
    return collate(seqs, tokenizer.pad_token_id)


def _model(tiny_model_dir, method):
    seed_everything(0)
    model, tokenizer = load(tiny_model_dir, dtype="fp32", device="cpu")
    if method is not None:
        spec = get_method(method)
        model = spec.apply(model, spec.config(), str(tiny_model_dir))
        if method == "lora":  # a non-zero B, so the adapter changes the outputs
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.1)
    return model.train(), tokenizer


@pytest.mark.parametrize("method", [None, "lora", "prompt_tuning", "p_tuning", "prefix_tuning"])
@pytest.mark.parametrize("completion_only", [True, False])
def test_sparse_loss_equals_full_logit_loss(tiny_model_dir, method, completion_only):
    model, tokenizer = _model(tiny_model_dir, method)
    batch = _batch(tokenizer, completion_only)
    sparse = sft_loss(model, batch)
    assert sparse.count == batch.num_loss_tokens
    (sparse.total).backward()
    sparse_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full = full_logits_nll(model, batch)
    full.backward()
    torch.testing.assert_close(sparse.total, full, rtol=1e-5, atol=1e-5)
    assert sparse_grads
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(sparse_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_only_answer_positions_reach_the_lm_head(tiny_model_dir):
    model, tokenizer = _model(tiny_model_dir, None)
    batch = _batch(tokenizer)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        found = token_logprobs(model, batch)
    finally:
        hook.remove()
    assert seen == [(batch.num_loss_tokens, model.config.hidden_size)]
    assert found.values.shape == (batch.num_loss_tokens,)
    sums, counts = sequence_logprobs(model, batch)
    assert counts.tolist() == [float((batch.labels[i, 1:] != IGNORE).sum()) for i in range(3)]
    assert torch.all(sums < 0)


def test_predicting_positions_shift_by_one():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE], [IGNORE, 7, IGNORE, IGNORE, IGNORE]])
    assert predicting_positions(labels).tolist() == [[False, True, True, False, False], [True, False, False, False, False]]


def test_the_forward_needs_the_columns_up_to_the_last_predicting_position():
    from honellm.training.batching import Batch, needed_width, predicting_index

    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE, IGNORE], [IGNORE, 7, 8, IGNORE, IGNORE, IGNORE]])
    assert needed_width(predicting_index(labels), 6) == 3  # position 2 predicts the 6; nothing reads columns 3-5
    assert needed_width(torch.zeros(0, dtype=torch.long), 6) == 1
    ids = torch.ones_like(labels)
    moved = Batch(ids, ids, labels, 12, 4).to("cpu")
    assert moved.needed_width == 3 and moved.predicting_index.tolist() == [1, 2, 6, 7]


def test_bf16_policy_frozen_bf16_trainable_fp32_and_loss_close_to_fp32(tiny_model_dir):
    model, tokenizer = _model(tiny_model_dir, "lora")
    batch = _batch(tokenizer)
    reference = float(sft_loss(model, batch).total)
    policy = Precision(torch.bfloat16, "cpu")
    policy.cast_model(model)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    # The products really ran in bf16 (a policy that silently left them in fp32 would pass the comparison below):
    # every linear layer, frozen or adapter, returns bf16 under the policy's autocast.
    dtypes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with policy.autocast():
        out = sft_loss(model, batch)
    for hook in hooks:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    out.total.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert float(out.total) != reference  # bf16 rounding shows...
    assert abs(float(out.total) - reference) / abs(reference) < 2e-3  # ...but only that (measured 5e-5)
