"""The numbers Hone computes equal transformers' own (fp32, within 1e-4) on every architecture of the matrix, or the
fast path steps aside: choice log-likelihoods as `hone eval` scores them, greedy generation with and without a
shared prefix, a LoRA training step's loss and gradients, and the per-sequence and per-token log-probs of the
preference and RL recipes.

Each architecture is a tiny random model (honellm.testing.ARCHITECTURES: sliding windows of 8 tokens, shorter than
every prompt here, soft-capping, q/k norms, attention biases, scaled embeddings and logits, MoE layers). The
reference is transformers' forward over each sequence alone (no padding, no cache, no prefix reuse), with every
fast path off. `python tests/unit/test_core_exactness.py` prints the architecture x path table with the largest
difference per check.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from honellm.core import fastpath, fused
from honellm.core.support import fast_path_support
from honellm.data.chat import render_prompt
from honellm.generation import Generator, SamplingParams
from honellm.testing import ARCHITECTURES, make_tiny_arch_model
from honellm.training.batching import IGNORE, collate, encode_conversation
from honellm.training.logprobs import sft_loss, token_logprobs

TOLERANCE = 1e-4
SYSTEM = "Classify the sentiment of the movie review as positive or negative. Answer with one word."
REVIEWS = ["a gripping, funny and warm film", "dull", "far too long and lifeless; the quick brown fox jumps over it"]
CHOICES = ["positive", "negative"]
# What each architecture takes (a change here is a decision: say why in honellm/core/support.py).
EXPECTED = {
    "llama": ("fast", "fast"), "qwen2": ("fast", "fast"), "qwen3": ("transformers", "fast"),
    **{arch: ("transformers", "transformers") for arch in
       ("mistral", "gemma2", "gemma3", "phi3", "olmo2", "granite", "gpt2", "gpt_neox", "opt", "qwen3_moe")},
}


def load_fp32(path, attention: str | None = "eager", *, dropout: bool = True):
    """The model in fp32 with `attention` (None: transformers' default, as `hone eval` loads it: sdpa where the
    architecture has it); `dropout=False` sets every dropout probability of the config to 0 (GPT-2's and OPT's
    are 0.1: two computations in training mode would draw different masks)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {} if attention is None else {"attn_implementation": attention}
    if not dropout:
        kwargs.update({key: 0.0 for key, value in AutoConfig.from_pretrained(path).to_dict().items()
                       if isinstance(value, float) and ("dropout" in key or "pdrop" in key)})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def messages(review: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Review: {review}"}]


class no_fast_paths:
    """transformers' forward and PEFT's own layers: HONE_FAST=0, and fused LoRA taken off `model`."""

    def __init__(self, model=None):
        self.model = model

    def __enter__(self):
        self.before = os.environ.get("HONE_FAST")
        os.environ["HONE_FAST"] = "0"
        if self.model is not None:
            fused.uninstall(self.model)

    def __exit__(self, *exc):
        if self.before is None:
            del os.environ["HONE_FAST"]
        else:
            os.environ["HONE_FAST"] = self.before
        if self.model is not None:
            fused.install(self.model)


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t + 1] | ids[:t + 1]) for every t, from transformers' forward over the sequence alone."""
    with no_fast_paths(), torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


# ------------------------------------------------------------------------------------------------ the checks


def choice_difference(model, tokenizer) -> float:
    """Choice log-likelihoods as `hone eval` computes them (scoring.choice_loglikelihoods, with the system turn as
    the shared prefix), and both ways `score_groups` may ask the engine, against transformers."""
    from honellm.evaluation.scoring import answer_affixes, choice_loglikelihoods

    generator = Generator(model, tokenizer, backend="torch", batch_size=8)
    prompts = [render_prompt(tokenizer, messages(r)) for r in REVIEWS]
    prefix = tokenizer.apply_chat_template(messages("")[:1], tokenize=False)
    assert all(p.startswith(prefix) for p in prompts)
    before, after = answer_affixes(tokenizer)
    continuations = [f"{before}{c}{after}" for c in CHOICES]
    expected = torch.tensor([[float(reference_logprobs(model, tokenizer(p + c)["input_ids"])[
        len(tokenizer(p)["input_ids"]) - 1:].sum()) for c in continuations] for p in prompts], dtype=torch.float64)
    ctx = SimpleNamespace(tokenizer=tokenizer, generator=generator, batch_size=8, advance=lambda n: None)
    found, _ = choice_loglikelihoods(ctx, prompts, CHOICES, shared_prefix=prefix)
    worst = (torch.from_numpy(found) - expected).abs().max().item()
    pairs = [(p, c) for p in prompts for c in continuations]
    for shared in (None, "auto"):  # the other ways: no reuse, the tokens all pairs share
        scores = generator.score_continuations([p for p, _ in pairs], [c for _, c in pairs], shared_prefix=shared)
        got = torch.tensor([s.logprob_sum for s in scores], dtype=torch.float64).view_as(expected)
        worst = max(worst, (got - expected).abs().max().item())
    for i, p in enumerate(prompts):  # and each context as the prefix of its continuations
        scores = generator.score_continuations([p] * len(continuations), continuations, shared_prefix=p)
        got = torch.tensor([s.logprob_sum for s in scores], dtype=torch.float64)
        worst = max(worst, (got - expected[i]).abs().max().item())
    return worst


def generation_difference(model, tokenizer, steps: int = 4) -> float:
    """Greedy generation with and without shared-prefix reuse against a greedy loop over transformers' forward
    (the whole sequence each step): the same tokens (else inf), and the largest log-prob difference."""
    generator = Generator(model, tokenizer, backend="torch", batch_size=8)
    prompts = [render_prompt(tokenizer, messages(r)) for r in REVIEWS]
    params = SamplingParams(max_new_tokens=steps, temperature=0.0, logprobs=True)
    expected = []
    for p in prompts:
        ids, tokens, logprobs = tokenizer(p)["input_ids"], [], []
        for _ in range(steps):
            with no_fast_paths(), torch.no_grad():
                last = model(input_ids=torch.tensor([ids + tokens])).logits[0, -1].float().log_softmax(-1)
            token = int(last.argmax())
            tokens.append(token)
            logprobs.append(float(last[token]))
            if token in generator.eos_ids:
                break
        expected.append((tokens, logprobs))
    worst = 0.0
    for shared in (None, "auto"):
        for completion, (tokens, logprobs) in zip(generator.generate(prompts, params, shared_prefix=shared), expected,
                                                  strict=True):
            if completion.token_ids != tokens:
                return float("inf")
            worst = max(worst, max(abs(a - b) for a, b in zip(completion.logprobs, logprobs, strict=True)))
    return worst


def lora_model(path):
    """The tuning recipe's setting in fp32: LoRA on every linear layer (B non-zero, so the adapter does something),
    eager attention (what SFT picks on a CPU), the fused LoRA layers installed, dropout off."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_fp32(path, dropout=False)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    fused.install(model)
    return model, tokenizer


def training_batch(tokenizer):
    """Three conversations sharing a system turn longer than the training forward's shared-prefix minimum."""
    answers = ["positive", "negative, and far too long", "negative"]
    sequences = [encode_conversation(tokenizer, messages(r), a, max_length=256) for r, a in zip(REVIEWS, answers,
                                                                                                 strict=True)]
    return collate(sequences, tokenizer.pad_token_id)


def reference_token_logprobs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target-token log-probs [n] (row-major) from transformers' forward over the right-padded batch, and the
    rows they belong to."""
    with no_fast_paths(model):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE
    values = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return values[keep], keep.nonzero()[:, 0]


def training_difference(model, batch) -> float:
    """A LoRA step's loss and gradients (honellm.training.logprobs.sft_loss, the recipe's forward) against the
    summed NLL of transformers' logits: the largest difference, relative to the gradient's scale."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = sft_loss(model, batch).total
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    values, _ = reference_token_logprobs(model, batch)
    reference = -values.sum()
    reference.backward()
    worst = abs(loss.item() - reference.item())
    for name, p in model.named_parameters():
        if p.grad is not None:
            scale = max(1.0, p.grad.abs().max().item())
            worst = max(worst, (grads[name] - p.grad).abs().max().item() / scale)
    model.zero_grad(set_to_none=True)
    return worst


def sequence_logprob_difference(model, batch) -> float:
    """DPO's per-sequence sums and GRPO's per-token log-probs (token_logprobs), the reference pass (eval, no
    gradient) and the policy's (training), against transformers'."""
    expected, rows = reference_token_logprobs(model, batch)
    expected_sums = torch.zeros(batch.input_ids.shape[0]).index_add_(0, rows, expected)
    worst = 0.0
    for training in (False, True):
        model.train(training)
        with torch.set_grad_enabled(training):
            found = token_logprobs(model, batch, with_entropy=True)
        worst = max(worst, (found.values.detach() - expected).abs().max().item(),
                    (found.per_sequence().detach() - expected_sums).abs().max().item())
    return worst


# ------------------------------------------------------------------------------------------------- the tests


ARCHS = sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_paths_are_the_expected_ones(arch_dir, arch):
    model, _ = load_fp32(arch_dir(arch))
    found = fast_path_support(model, kernels=False)
    taken = tuple("fast" if getattr(found, p) else "transformers" for p in ("training", "decoding"))
    assert taken == EXPECTED[arch], found.reasons
    for path in ("training", "decoding"):
        assert getattr(found, path) or found.reasons[path]  # every "no" says why


@pytest.mark.parametrize("arch", ARCHS)
def test_choice_loglikelihoods_equal_transformers(arch_dir, arch):
    model, tokenizer = load_fp32(arch_dir(arch), attention=None)  # as `hone eval` loads a model
    assert choice_difference(model, tokenizer) <= TOLERANCE


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_transformers(arch_dir, arch):
    model, tokenizer = load_fp32(arch_dir(arch), attention=None)
    assert generation_difference(model, tokenizer) <= TOLERANCE


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_step_and_sequence_logprobs_equal_transformers(arch_dir, arch, monkeypatch):
    model, tokenizer = lora_model(arch_dir(arch))
    batch = training_batch(tokenizer)
    calls = []
    original = fastpath._layer
    monkeypatch.setattr(fastpath, "_layer", lambda *a: calls.append(1) or original(*a))
    assert training_difference(model, batch) <= TOLERANCE
    assert bool(calls) == (EXPECTED[arch][0] == "fast")  # the path the check says is the path that ran
    assert sequence_logprob_difference(model, batch) <= TOLERANCE


def test_eager_masks_for_windowed_models_equal_transformers(arch_dir):
    """The HF runner's own masks (sliding-window models) in their eager form as well as sdpa's (gemma2 has eager
    only; mistral and gemma3 load sdpa by default)."""
    for arch in ("mistral", "gemma3"):
        model, tokenizer = load_fp32(arch_dir(arch), attention="eager")
        assert choice_difference(model, tokenizer) <= TOLERANCE


def table(folder) -> list[dict]:
    """The architecture x path table with the largest difference per check (`python -m` this file)."""
    from pathlib import Path

    rows = []
    for arch in ARCHS:
        path = make_tiny_arch_model(Path(folder) / arch, arch)
        model, tokenizer = load_fp32(path, attention=None)
        found = fast_path_support(model)
        row = {"arch": arch, "training": found.path("training"), "decoding": found.path("decoding"),
               "choices": choice_difference(model, tokenizer), "generation": generation_difference(model, tokenizer)}
        model, tokenizer = lora_model(path)
        batch = training_batch(tokenizer)
        row["lora_step"] = training_difference(model, batch)
        row["seq_logprobs"] = sequence_logprob_difference(model, batch)
        rows.append(row)
    return rows


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        found = table(folder)
    print("| architecture | training | decoding | choice log-lik | greedy gen | LoRA loss/grads | DPO/GRPO log-probs |")
    print("|---|---|---|---|---|---|---|")
    for r in found:
        short = {k: r[k].split(" (")[0] for k in ("training", "decoding")}
        print(f"| {r['arch']} | {short['training']} | {short['decoding']} | {r['choices']:.1e} | {r['generation']:.1e} "
              f"| {r['lora_step']:.1e} | {r['seq_logprobs']:.1e} |")
