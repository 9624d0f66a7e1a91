"""Padding-free packing: the layout (`batching.pack`), the token-budget split, the same loss and gradients as the
padded batch on tiny random models of several architectures (fp32, 1e-5), the direct training forward taking
packed batches exactly, the one check that rules packing out (`support.packing_problem`), and the SFT recipe
with `packing=true`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from honellm.core import fastpath
from honellm.core.support import packing_problem
from honellm.errors import HoneError
from honellm.runs import read_metrics
from honellm.testing import make_tiny_task
from honellm.training import setup
from honellm.training.batching import IGNORE, TokenSequence, collate, pack, token_budget_micro_batches
from honellm.training.logprobs import sft_loss
from honellm.tuning import tune_task

TOLERANCE = 1e-5


def sequences(lengths=(13, 7, 20, 11), seed=1) -> list[TokenSequence]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        out.append(TokenSequence(ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    out.append(TokenSequence(ids[:9], list(ids[:9])))  # a loss on every token, the first one included
    return out


def test_pack_lays_sequences_end_to_end_with_their_boundaries():
    seqs = sequences()
    batch = pack(seqs)
    total = sum(len(s) for s in seqs)
    assert batch.packed and batch.input_ids.shape == (1, total) and batch.num_tokens == total
    assert batch.cu_seqlens.tolist() == [0, 13, 20, 40, 51, 60] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 20
    starts = batch.cu_seqlens[:-1].long()
    assert (batch.position_ids[0, starts] == 0).all()
    assert batch.position_ids[0, 13:20].tolist() == list(range(7))
    # The first token of a sequence is never a target: the previous sequence's last token must not predict it.
    assert (batch.labels[0, starts] == IGNORE).all()
    assert batch.num_loss_tokens == collate(seqs, 0).num_loss_tokens == int((batch.labels[0, 1:] != IGNORE).sum())
    moved = batch.to("cpu")
    assert torch.equal(moved.position_ids, batch.position_ids) and moved.max_seqlen == 20


def test_token_budget_split_covers_the_batch_within_the_budget():
    lengths = np.array([50, 10, 30, 200, 40, 20, 60, 5])
    indices = np.arange(len(lengths))
    bins = token_budget_micro_batches(indices, lengths, 100)
    assert sorted(np.concatenate(bins).tolist()) == indices.tolist()
    for b in bins:
        assert lengths[b].sum() <= 100 or len(b) == 1  # an example longer than the budget goes alone
    assert [lengths[b].tolist() for b in bins] == [[200], [60, 40], [50, 30, 20], [10, 5]]  # first-fit decreasing
    again = token_budget_micro_batches(indices[::-1], lengths, 100)
    assert [b.tolist() for b in again] == [b.tolist() for b in bins]  # depends on the examples, not their order
    parts = [token_budget_micro_batches(indices, lengths, 100, parts=2, part=k) for k in range(2)]
    assert sorted(np.concatenate([np.concatenate(p) for p in parts]).tolist()) == indices.tolist()
    with pytest.raises(ValueError):
        token_budget_micro_batches(indices, lengths, 0)


def load_fp32(path, attention):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    for key, value in list(vars(config).items()):  # GPT-2's and OPT's dropouts: two passes would draw other masks
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
            setattr(config, key, 0.0)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation=attention,
                                                 dtype=torch.float32)
    return model.train()


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = sft_loss(model, batch)
    out.total.backward()
    return out.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(float(loss_a - loss_b)) <= TOLERANCE * abs(float(loss_a))
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert float((grad - grads_b[name]).abs().max() / scale) <= TOLERANCE, name


# llama/qwen2 eager take the direct training forward; mistral and gemma2 have 8-token windows (shorter than the
# sequences); the rest run transformers' packed-sequence masks (sdpa and eager).
CASES = [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "eager"), ("mistral", "sdpa"), ("gemma2", "eager"),
         ("phi3", "sdpa"), ("gpt2", "eager"), ("gpt_neox", "sdpa"), ("qwen3_moe", "sdpa")]


@pytest.mark.parametrize("arch,attention", CASES)
def test_packed_loss_and_gradients_equal_the_padded_ones(arch_dir, arch, attention):
    model = load_fp32(arch_dir(arch), attention)
    assert packing_problem(model) is None
    seqs = sequences()
    assert_close(loss_and_grads(model, collate(seqs, 0)), loss_and_grads(model, pack(seqs)))


def test_the_direct_forward_takes_packed_batches_exactly(arch_dir, monkeypatch):
    model = load_fp32(arch_dir("llama"), "eager")
    batch = pack(sequences())
    found = fastpath.hidden_states(model, batch.input_ids, batch.attention_mask, position_ids=batch.position_ids)
    assert found is not None and found.shape == (1, batch.input_ids.shape[1], model.config.hidden_size)
    direct = loss_and_grads(model, batch)
    monkeypatch.setenv("HONE_FAST_FORWARD", "0")  # transformers' forward with its own packed-sequence mask
    assert fastpath.hidden_states(model, batch.input_ids, batch.attention_mask,
                                  position_ids=batch.position_ids) is None
    assert_close(direct, loss_and_grads(model, batch))


def test_packed_mask_is_block_diagonal_causal():
    mask = fastpath.packed_mask(torch.tensor([[0, 1, 2, 0, 1]]))
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]


def test_packing_check_rules_out_what_it_cannot_keep_apart(arch_dir, monkeypatch):
    from transformers import AutoConfig

    assert "OPT" in packing_problem(AutoConfig.from_pretrained(arch_dir("opt")))
    model = load_fp32(arch_dir("opt"), "eager")
    seqs = sequences()  # the reason is real: OPT's positions come from the attention mask
    assert abs(float(loss_and_grads(model, collate(seqs, 0))[0] - loss_and_grads(model, pack(seqs))[0])) > 1e-3
    assert packing_problem(load_fp32(arch_dir("llama"), "eager")) is None
    monkeypatch.setenv("HONE_PACKING", "0")
    assert packing_problem(load_fp32(arch_dir("llama"), "eager")) == "HONE_PACKING=0"


@pytest.fixture(scope="module")
def task_yaml(tiny_model_dir, tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("task"), tiny_model_dir)


def test_sft_with_packing_trains_like_padded_batches(task_yaml, tmp_path):
    common = ["max_steps=2", "eval_every=0", "save_every=0", "precision=fp32", "batch_size=4", "grad_accum=2",
              "lr=1e-3", "r=4"]
    padded = tune_task(str(task_yaml), "lora", common + ["packing=false"], out=str(tmp_path / "padded"))
    packed = tune_task(str(task_yaml), "lora", common + ["packing=true", "max_tokens_per_batch=64"],
                       out=str(tmp_path / "packed"))
    rows = {name: read_metrics(tmp_path / name / "metrics.jsonl") for name in ("padded", "packed")}
    start = {name: next(r for r in found if r.get("event") == "start") for name, found in rows.items()}
    assert start["packed"]["packing"] is True and start["packed"]["max_tokens_per_batch"] == 64
    assert start["padded"]["packing"] is False
    losses = {name: [r["loss"] for r in found if "loss" in r] for name, found in rows.items()}
    assert len(losses["packed"]) == 2
    for a, b in zip(losses["padded"], losses["packed"], strict=True):  # the same global batches, the same update
        assert abs(a - b) <= 1e-4 * abs(a)
    assert packed.manifest.config["packing"] is True and padded.manifest.metrics["final_step"] == 2


def test_sft_with_static_rows_trains_like_padded_batches(task_yaml, tmp_path, monkeypatch):
    """cuda_graphs=true's loop on a CPU, its CUDA checks and its compile stood aside: every micro-batch one static
    row (a filler, empty sequence slots), each marked as a new graph iteration, validation run eagerly; the same
    losses and validation scores as padded batches."""
    from honellm.tuning import sft

    marks = []
    monkeypatch.setattr(sft, "_cuda_graphs_slots",
                        lambda config, *a, per_process, **k: per_process + 1 if config.cuda_graphs else None)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    owned = []
    monkeypatch.setattr(sft, "compile_for_graphs", lambda model: (owned.append(1), setup.own_gradients(model)))
    shapes = set()

    def pack_and_note(seqs, **static):
        batch = pack(seqs, **static)
        shapes.add((tuple(batch.input_ids.shape), tuple(batch.cu_seqlens.shape), batch.max_seqlen))
        return batch

    monkeypatch.setattr(sft, "pack", pack_and_note)
    common = ["max_steps=2", "eval_every=1", "save_every=0", "precision=fp32", "batch_size=4", "grad_accum=2",
              "lr=1e-3", "r=4"]
    padded = tune_task(str(task_yaml), "lora", common + ["packing=false"], out=str(tmp_path / "padded"))
    static = tune_task(str(task_yaml), "lora", common + ["packing=true", "max_tokens_per_batch=64",
                                                         "cuda_graphs=true"], out=str(tmp_path / "static"))
    rows = {name: read_metrics(tmp_path / name / "metrics.jsonl") for name in ("padded", "static")}
    assert next(r for r in rows["static"] if r.get("event") == "start")["cuda_graphs"] is True
    assert shapes == {((1, 64), (10,), 64)} and len(marks) >= 4  # 8 examples a step (+ the filler), 2+ rows a step
    assert owned == [1]
    losses = {name: [r["loss"] for r in found if "loss" in r] for name, found in rows.items()}
    assert len(losses["static"]) == 2 and losses["static"] == pytest.approx(losses["padded"], rel=1e-4)
    assert static.manifest.metrics["val_loss"] == pytest.approx(padded.manifest.metrics["val_loss"], rel=1e-4)


def test_packing_true_on_a_model_that_cannot_pack_is_a_clear_error(arch_dir, tmp_path):
    task = make_tiny_task(tmp_path / "task", arch_dir("opt"))
    with pytest.raises(HoneError, match="packing=true"):
        tune_task(str(task), "lora", ["max_steps=1", "eval_every=0", "packing=true"], out=str(tmp_path / "run"))


def test_gradients_are_copied_out_of_a_graph_pool_once_a_step():
    """cuda_graphs=true: autograd keeps a compiled backward's output as `.grad` itself (memory a later CUDA graph
    replay reuses); `own_gradients` gives each parameter a gradient of its own when first set, into which later
    micro-batches add, and again after the optimizer's zero_grad."""
    weight = torch.nn.Parameter(torch.zeros(3))
    model = torch.nn.Module()
    model.weight = weight
    setup.own_gradients(model)
    handed = []

    class Pool(torch.autograd.Function):  # a backward whose output autograd can keep as .grad (nothing else holds it)
        @staticmethod
        def forward(ctx, w):
            return w * 1.0

        @staticmethod
        def backward(ctx, grad):
            out = grad * 2.0
            handed.append(out.data_ptr())  # its address only: a reference would stop autograd keeping it
            return out

    Pool.apply(weight).sum().backward()
    assert weight.grad.tolist() == [2.0, 2.0, 2.0]
    assert weight.grad.data_ptr() != handed[0]  # its own storage, not the backward's output
    first = weight.grad
    Pool.apply(weight).sum().backward()
    assert weight.grad is first and weight.grad.tolist() == [4.0, 4.0, 4.0]  # accumulated in place
    weight.grad = None
    Pool.apply(weight).sum().backward()
    assert weight.grad.data_ptr() != handed[-1] and weight.grad.tolist() == [2.0, 2.0, 2.0]
