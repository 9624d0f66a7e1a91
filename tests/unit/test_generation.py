"""Contracts of the generation engine on tiny random models (fp32, CPU, a few seconds in all).

The session's `tiny_model` is nearly constant at its initial scale (it repeats one token), so most tests use a
"lively" copy whose weights are redrawn with a larger spread: its outputs vary, reach EOS at different steps and
contain broken UTF-8 byte sequences, which exercises every path of the engine.
"""

from __future__ import annotations

import copy

import pytest
import torch

from honellm.core.runners import DecoderRunner, HFRunner
from honellm.errors import HoneError, MissingDependency
from honellm.generation import FINISH_LENGTH, FINISH_STOP, Generator, SamplingParams, eos_token_ids
from honellm.generation.text import CompletionText
from honellm.generation.vllm_backend import select_backend

QUESTIONS = [
    "hi",
    "Review: a gripping, funny and warm film.",
    "What is 2 + 3?",
    "Classify the message: my card was charged twice.",
    "Human: how do I bake bread?",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture(scope="module")
def lively(tiny_model):
    model, tok = tiny_model
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval(), tok


def chat(tok, questions=QUESTIONS, system=None):
    prompts = []
    for q in questions:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": q})
        prompts.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return prompts


def reference_greedy(model, tok, prompt: str, max_new_tokens: int) -> list[int]:
    """`model.generate(do_sample=False)` for one prompt, cut after its first EOS."""
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    ids = out[0, enc.input_ids.shape[1]:].tolist()
    eos = eos_token_ids(model, tok)
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def nontrivial(completions, at_least: int, varied: int | None = None) -> list[list[int]]:
    """The token ids of `completions` (outputs or id lists), checked to be real completions before a test compares
    them with others (two empty, one-token or one-token-repeated completions are equal whatever the engine
    computes): each at least `at_least` tokens long, and `varied` of them (all by default) made of at least two
    different tokens. The random `lively` model repeats one token on some prompts ("hi"); the session's tiny model, left
    at its initialisation, on every prompt."""
    lists = [list(getattr(c, "token_ids", c)) for c in completions]
    assert lists and all(len(ids) >= at_least for ids in lists), lists
    assert sum(len(set(ids)) >= 2 for ids in lists) >= (len(lists) if varied is None else varied), lists
    return lists


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


# ---------------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("batch_size", [1, 4])
def test_greedy_matches_model_generate(lively, batch_size):
    model, tok = lively
    prompts = chat(tok)
    outs = Generator(model, tok, batch_size=batch_size).generate(prompts, SamplingParams(max_new_tokens=24))
    nontrivial(outs, 24)
    assert len({tuple(o.token_ids) for o in outs}) == len(prompts)
    for prompt, out in zip(prompts, outs, strict=True):
        expected = reference_greedy(model, tok, prompt, 24)
        assert out.token_ids == expected
        assert out.completion_tokens == len(expected)
        assert out.prompt_tokens == len(tok(prompt, add_special_tokens=False).input_ids)


def test_greedy_matches_batched_model_generate_with_left_padding(lively):
    model, tok = lively
    prompts = chat(tok)
    tok = copy.copy(tok)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    outs = Generator(model, tok, batch_size=len(prompts)).generate(prompts, SamplingParams(max_new_tokens=16))
    nontrivial(outs, 16)  # no end of turn here: each row is compared over all 16 tokens
    for row, out in zip(ref[:, enc.input_ids.shape[1]:].tolist(), outs, strict=True):
        assert row[: len(out.token_ids)] == out.token_ids


def test_greedy_on_the_session_tiny_model(tiny_model):
    model, tok = tiny_model
    prompt = chat(tok)[1]
    out = Generator(model, tok).generate([prompt], SamplingParams(max_new_tokens=12))[0]
    # its initialisation repeats one token: this checks the 12 steps and the configuration; `lively` the tokens
    assert nontrivial([out], 12, varied=0) == [reference_greedy(model, tok, prompt, 12)]


def test_token_id_prompts_equal_string_prompts(lively):
    model, tok = lively
    prompts = chat(tok)[1:4]  # prompts `lively` answers with at least two different tokens
    gen = Generator(model, tok)
    as_text = gen.generate(prompts, SamplingParams(max_new_tokens=10))
    as_ids = gen.generate([tok(p, add_special_tokens=False).input_ids for p in prompts], SamplingParams(max_new_tokens=10))
    assert nontrivial(as_text, 10) == [o.token_ids for o in as_ids]


def test_eos_ends_a_completion_and_is_not_in_its_text(lively):
    model, tok = lively
    prompt = chat(tok)[4]
    free = Generator(model, tok).generate([prompt], SamplingParams(max_new_tokens=8))[0]
    assert free.finish_reason == FINISH_LENGTH and len(set(free.token_ids)) > 1
    # Make the 4th greedy token an end-of-turn id through the generation config, as SmolLM2's <|im_end|> is.
    model = copy.deepcopy(model)
    stop_token = free.token_ids[3]
    model.generation_config.eos_token_id = [tok.eos_token_id, stop_token]
    out = Generator(model, tok).generate([prompt], SamplingParams(max_new_tokens=8))[0]
    first = free.token_ids.index(stop_token)
    assert out.finish_reason == FINISH_STOP
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.text == tok.decode(free.token_ids[:first], skip_special_tokens=True)


def test_eos_ids_merge_tokenizer_and_generation_config(lively):
    model, tok = lively
    model = copy.deepcopy(model)
    model.generation_config.eos_token_id = [5, 7]
    assert eos_token_ids(model, tok) == {tok.eos_token_id, 5, 7}


def test_rows_finishing_early_are_dropped_without_changing_the_others(lively):
    """With a frequent token as EOS most rows end within a few steps; the batch shrinks and the rest continue."""
    model, tok = lively
    prompts = chat(tok)
    free = Generator(model, tok, batch_size=6).generate(prompts, SamplingParams(max_new_tokens=20))
    counts: dict[int, int] = {}
    for o in free:
        for t in o.token_ids[:3]:
            counts[t] = counts.get(t, 0) + 1
    model = copy.deepcopy(model)
    model.generation_config.eos_token_id = [tok.eos_token_id, max(counts, key=counts.get)]
    outs = Generator(model, tok, batch_size=6).generate(prompts, SamplingParams(max_new_tokens=20))
    assert sum(len(o.token_ids) < 5 for o in outs) >= 3 and max(len(o.token_ids) for o in outs) > 5
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == reference_greedy(model, tok, prompt, 20)


# ------------------------------------------------------------------------------------------------ prefix reuse


@pytest.mark.parametrize("batch_size", [2, 5])
def test_shared_prefix_reuse_gives_the_same_greedy_outputs(lively, batch_size):
    model, tok = lively
    system = "You are a helpful assistant. Answer with one word: yes or no."
    prompts = chat(tok, system=system)  # several suffix lengths after a long common prefix
    gen = Generator(model, tok, batch_size=batch_size)
    params = SamplingParams(max_new_tokens=12)
    plain = gen.generate(prompts, params)
    prefix_text = prompts[0][: prompts[0].index("<|im_start|>user")]
    for shared in ("auto", prefix_text, tok(prefix_text, add_special_tokens=False).input_ids):
        reused = gen.generate(prompts, params, shared_prefix=shared)
        assert [o.token_ids for o in reused] == nontrivial(plain, 12)
        assert [o.text for o in reused] == [o.text for o in plain]


def test_shared_prefix_with_sampling_and_logprobs(lively):
    model, tok = lively
    prompts = chat(tok, system="Classify the sentiment of the movie review as positive or negative.")
    gen = Generator(model, tok, batch_size=3)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11, logprobs=True)
    plain = gen.generate(prompts, params)
    reused = gen.generate(prompts, params, shared_prefix="auto")
    assert [o.token_ids for o in reused] == [o.token_ids for o in plain]
    for a, b in zip(plain, reused, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_shared_prefix_that_a_prompt_lacks_is_an_error(lively):
    model, tok = lively
    with pytest.raises(HoneError, match="does not start with the shared prefix"):
        Generator(model, tok).generate(["abc", "xyz"], shared_prefix="ab")


def test_auto_prefix_of_a_single_prompt_is_harmless(lively):
    model, tok = lively
    prompt = chat(tok)[1]
    gen = Generator(model, tok)
    params = SamplingParams(max_new_tokens=6)
    assert gen.generate([prompt], params, shared_prefix="auto")[0].token_ids == nontrivial(gen.generate([prompt], params), 6)[0]


# ---------------------------------------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible(lively):
    model, tok = lively
    prompts = chat(tok)
    gen = Generator(model, tok, batch_size=4)
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=123)
    first, second = gen.generate(prompts, params), gen.generate(prompts, params)
    assert [o.token_ids for o in first] == [o.token_ids for o in second]
    other = gen.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=124))
    assert [o.token_ids for o in first] != [o.token_ids for o in other]
    greedy = gen.generate(prompts, SamplingParams(max_new_tokens=16))
    assert [o.token_ids for o in first] != [o.token_ids for o in greedy]


@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_top_k_1_equals_greedy(lively, top_p):
    model, tok = lively
    prompts = chat(tok)
    gen = Generator(model, tok, batch_size=3)
    greedy = gen.generate(prompts, SamplingParams(max_new_tokens=12))
    top1 = gen.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1, top_p=top_p, seed=5))
    assert [o.token_ids for o in top1] == nontrivial(greedy, 12)


def test_sampling_stays_inside_top_k_and_top_p():
    from honellm.generation.sampling import choose_tokens

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    tokens, _ = choose_tokens(logits, SamplingParams(temperature=1.0, top_k=2), generator)
    assert set(tokens.tolist()) == {0, 1}
    tokens, _ = choose_tokens(logits, SamplingParams(temperature=1.0, top_p=0.7), generator)
    assert set(tokens.tolist()) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
    share = (tokens == 0).float().mean().item()
    assert 0.55 < share < 0.70  # 0.5 / 0.8 = 0.625 after renormalizing
    tokens, _ = choose_tokens(logits, SamplingParams(temperature=1.0), generator)
    assert set(tokens.tolist()) == {0, 1, 2, 3}


def test_draws_over_a_whole_vocabulary_follow_the_distribution(monkeypatch):
    """Inverse transform sampling (used over more than MULTINOMIAL_MAX candidates, here forced on 6 tokens) draws
    each token at its probability and never one of probability zero."""
    import honellm.generation.sampling as sampling

    monkeypatch.setattr(sampling, "MULTINOMIAL_MAX", 2)
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    logits = torch.log(probs).repeat(40000, 1)
    tokens, _ = sampling.choose_tokens(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    shares = torch.bincount(tokens, minlength=6).float() / len(tokens)
    assert shares[1] == 0 and shares[5] == 0
    assert torch.allclose(shares, probs, atol=0.01), shares
    again, _ = sampling.choose_tokens(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)  # seeded


def test_a_training_model_is_switched_to_eval_once_per_call_and_back(lively, monkeypatch):
    """`train()`/`eval()` walk every module: a training policy (GRPO's) is switched once per generate call, not
    per decoding step, and is training again afterwards."""
    model, tok = lively
    model = copy.deepcopy(model).train()
    switches = []
    real_train = type(model).train
    monkeypatch.setattr(type(model), "train", lambda self, mode=True: switches.append(mode) or real_train(self, mode))
    gen = Generator(model, tok)
    out = gen.generate(chat(tok)[:3], SamplingParams(max_new_tokens=12, temperature=1.0, seed=0))
    assert max(len(o.token_ids) for o in out) > 2
    assert switches == [False, True] and model.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_runner_rotation_is_transformers_rotary_bit_for_bit(dtype):
    from transformers.models.llama.modeling_llama import rotate_half

    from honellm.core.runners import _rotate, _signed_sin

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 64, generator=generator).to(dtype)
    cos, sin = (torch.randn(3, 1, 7, 64, generator=generator).to(dtype) for _ in range(2))
    assert torch.equal(_rotate(x, cos, _signed_sin(sin)), x * cos + rotate_half(x) * sin)


def test_sampling_follows_hugging_face_warpers_on_bf16_logits():
    """Temperature, then top-k, then top-p (transformers' order) on bf16 logits: the engine draws from the same
    distribution as transformers' warpers computed in fp32 (the engine converts only the top-k survivors)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from honellm.generation.sampling import choose_tokens

    logits = (torch.randn(1, 300, generator=torch.Generator().manual_seed(3)) * 3).to(torch.bfloat16)
    scores = logits.float()
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9)):
        scores = warper(None, scores)
    expected = scores.softmax(-1)[0]
    draws = 40000
    tokens, _ = choose_tokens(logits.repeat(draws, 1), SamplingParams(temperature=0.7, top_k=20, top_p=0.9),
                              torch.Generator().manual_seed(0))
    observed = torch.bincount(tokens, minlength=300).float() / draws
    assert set(tokens.unique().tolist()) <= set(expected.nonzero()[:, 0].tolist())
    assert 0.5 * (observed - expected).abs().sum().item() < 0.02  # total variation distance


def test_top_p_falls_back_to_a_full_sort_for_flat_distributions():
    from honellm.generation import sampling

    logits = torch.zeros(3, 2 * sampling.TOP_P_CANDIDATES)  # uniform: the nucleus is wider than the candidates
    generator = torch.Generator().manual_seed(0)
    tokens, _ = sampling.choose_tokens(logits.repeat(300, 1), SamplingParams(temperature=1.0, top_p=0.9), generator)
    assert tokens.max().item() >= sampling.TOP_P_CANDIDATES  # tokens beyond the first candidates were reachable


def test_logprobs_match_a_forward_pass(lively):
    model, tok = lively
    prompts = chat(tok)[:4]
    gen = Generator(model, tok, batch_size=4)
    for params in (SamplingParams(max_new_tokens=10, logprobs=True),
                   SamplingParams(max_new_tokens=10, temperature=0.8, top_k=20, seed=3, logprobs=True)):
        for prompt, out in zip(prompts, gen.generate(prompts, params), strict=True):
            ids = tok(prompt, add_special_tokens=False).input_ids
            table = full_logprobs(model, ids + out.token_ids)
            expected = [table[len(ids) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
            assert len(out.logprobs) == len(out.token_ids)
            assert out.logprobs == pytest.approx(expected, abs=1e-4)


def test_top_logprobs_match_a_forward_pass(lively):
    """Every step's top-k alternatives are the k largest entries of transformers' log-softmax at that position,
    in order; with a temperature they are still the raw model's (temperature 1), as vLLM and OpenAI report."""
    model, tok = lively
    prompts = chat(tok)[:3]
    gen = Generator(model, tok, batch_size=3)
    for params in (SamplingParams(max_new_tokens=8, top_logprobs=5),
                   SamplingParams(max_new_tokens=8, temperature=0.7, seed=4, top_logprobs=3)):
        assert params.logprobs  # top_logprobs implies the chosen tokens' logprobs
        for prompt, out in zip(prompts, gen.generate(prompts, params), strict=True):
            ids = tok(prompt, add_special_tokens=False).input_ids
            table = full_logprobs(model, ids + out.token_ids)
            assert len(out.top_logprobs) == len(out.token_ids)
            for i, alternatives in enumerate(out.top_logprobs):
                values, top_ids = table[len(ids) - 1 + i].topk(params.top_logprobs)
                assert [a[0] for a in alternatives] == top_ids.tolist()
                assert [a[1] for a in alternatives] == pytest.approx(values.tolist(), abs=1e-4)
                assert out.logprobs[i] == pytest.approx(table[len(ids) - 1 + i, out.token_ids[i]].item(), abs=1e-4)


def test_top_logprobs_bounds_are_checked():
    with pytest.raises(HoneError, match="top_logprobs"):
        SamplingParams(top_logprobs=21)
    assert SamplingParams(top_logprobs=0).logprobs is False


def test_stream_batch_matches_generate_row_by_row(lively):
    model, tok = lively
    prompts = chat(tok)[:3]
    gen = Generator(model, tok, batch_size=4)
    params = SamplingParams(max_new_tokens=12, stop=("e",))
    texts = ["", "", ""]
    pieces = gen.stream_batch(prompts, params)
    while True:
        try:
            index, piece = next(pieces)
        except StopIteration as stop:
            finals = stop.value
            break
        texts[index] += piece
    expected = gen.generate(prompts, params)
    assert texts == [c.text for c in expected] == [c.text for c in finals]
    assert [c.finish_reason for c in finals] == [c.finish_reason for c in expected]


def test_logprobs_are_none_unless_asked(lively):
    model, tok = lively
    assert Generator(model, tok).generate(["hi"], SamplingParams(max_new_tokens=3))[0].logprobs is None


# ------------------------------------------------------------------------------------------ stopping and length


def test_max_new_tokens_gives_finish_reason_length(lively):
    model, tok = lively
    outs = Generator(model, tok).generate(chat(tok), SamplingParams(max_new_tokens=5))
    for out in outs:
        assert out.completion_tokens <= 5
        assert out.finish_reason == (FINISH_LENGTH if out.completion_tokens == 5 else FINISH_STOP)
    assert any(out.finish_reason == FINISH_LENGTH for out in outs)


def test_stop_strings_trim_the_text(lively):
    model, tok = lively
    prompt = chat(tok)[2]
    gen = Generator(model, tok)
    free = gen.generate([prompt], SamplingParams(max_new_tokens=30))[0]
    text = free.text
    assert len(text) > 12
    stop = text[6:9]  # a string the free run produces in the middle
    first = text.index(stop)
    out = gen.generate([prompt], SamplingParams(max_new_tokens=30, stop=(stop, "never-produced")))[0]
    assert out.finish_reason == FINISH_STOP
    assert out.text == text[:first]
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    # Generation ends with the token that completed the stop string.
    assert stop in tok.decode(out.token_ids, skip_special_tokens=True)
    assert stop not in tok.decode(out.token_ids[:-1], skip_special_tokens=True)


def test_empty_inputs_give_empty_outputs(lively):
    model, tok = lively
    gen = Generator(model, tok)
    assert gen.generate([]) == [] and gen.score_continuations([], []) == []
    with pytest.raises(HoneError, match="empty"):
        gen.generate(["hi", ""])


def test_a_single_stop_string_is_accepted_as_a_string():
    assert SamplingParams(stop="\n").stop == ("\n",)


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -2},
                                    {"stop": ("",)}])
def test_invalid_sampling_params_are_user_errors(kwargs):
    with pytest.raises(HoneError):
        SamplingParams(**kwargs)


def test_max_length_caps_the_completion_and_rejects_long_prompts(lively):
    model, tok = lively
    prompt = chat(tok)[0]
    n = len(tok(prompt, add_special_tokens=False).input_ids)
    gen = Generator(model, tok, max_length=n + 3)
    out = gen.generate([prompt], SamplingParams(max_new_tokens=10))[0]
    assert out.completion_tokens == 3 and out.finish_reason == FINISH_LENGTH
    with pytest.raises(HoneError, match="context holds"):
        Generator(model, tok, max_length=n).generate([prompt])


# -------------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=30),
                                    SamplingParams(max_new_tokens=30, temperature=1.0, seed=2),
                                    SamplingParams(max_new_tokens=30, stop=("e",))])
def test_stream_concatenates_to_the_generated_text(lively, params):
    model, tok = lively
    gen = Generator(model, tok)
    for prompt in chat(tok)[:4]:
        pieces = list(gen.stream(prompt, params))
        assert "".join(pieces) == gen.generate([prompt], params)[0].text
        assert all(pieces)


def test_stream_never_splits_a_utf8_character(lively):
    _, tok = lively
    text = "café 😀 naïve — ok"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text) // 2  # byte-level pieces: multi-byte characters span several tokens
    tracker = CompletionText(tok, [], ())
    pieces = [tracker.delta(ids[: i + 1], finished=False) for i in range(len(ids))]
    pieces.append(tracker.delta(ids, finished=True))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_holds_back_a_possible_stop_string(lively):
    _, tok = lively
    ids = tok("abc STOP def", add_special_tokens=False).input_ids
    tracker = CompletionText(tok, [], ("STOP",))
    seen = ""
    for i in range(len(ids)):
        if tracker.hits_stop(ids[: i + 1]):
            break
        seen += tracker.delta(ids[: i + 1], finished=False)
        assert "S" not in seen
    seen += tracker.delta(ids[: i + 1], finished=True)
    assert seen == "abc "


def test_stream_returns_its_completion(lively):
    model, tok = lively
    gen = Generator(model, tok)
    prompt, params = chat(tok)[1], SamplingParams(max_new_tokens=7, logprobs=True)
    stream = gen.stream(prompt, params)
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as stop:
            completion = stop.value
            break
    expected = gen.generate([prompt], params)[0]
    assert completion.token_ids == expected.token_ids and completion.text == "".join(pieces) == expected.text
    assert (completion.finish_reason, completion.completion_tokens) == (expected.finish_reason, 7)


def test_chat_newline_stays_in_the_context_when_scoring(lively):
    model, tok = lively
    gen = Generator(model, tok)
    prompt = chat(tok)[0]
    assert prompt.endswith("\n")
    context, continuation = gen._encode_pair(prompt, "positive")
    assert context == tok(prompt, add_special_tokens=False).input_ids
    assert tok.decode(continuation) == "positive"
    context, continuation = gen._encode_pair("Review: fine. Sentiment: ", "positive")
    assert tok.decode(continuation) == " positive"


def test_stream_does_not_leave_inference_mode_on(lively):
    model, tok = lively
    stream = Generator(model, tok).stream(chat(tok)[0], SamplingParams(max_new_tokens=4))
    next(stream)
    assert not torch.is_inference_mode_enabled()
    list(stream)


# ------------------------------------------------------------------------------------------------------ scoring


def test_score_continuations_equals_a_full_forward(lively):
    model, tok = lively
    contexts = [p + "Review: dull" for p in chat(tok)[:3]] + ["The quick brown", "What is 2 + 3? "]
    continuations = [" positive", " negative<|im_end|>", "ly long", " fox", "5"]
    scores = Generator(model, tok, batch_size=2).score_continuations(contexts, continuations)
    for ctx, cont, score in zip(contexts, continuations, scores, strict=True):
        spaces = len(ctx) - len(ctx.rstrip(" "))
        if spaces:  # lm-evaluation-harness moves a context's trailing spaces to the continuation
            ctx, cont = ctx[:-spaces], ctx[-spaces:] + cont
        ctx_ids = tok(ctx, add_special_tokens=False).input_ids
        cont_ids = tok(ctx + cont, add_special_tokens=False).input_ids[len(ctx_ids):]
        table = full_logprobs(model, ctx_ids + cont_ids)
        positions = range(len(ctx_ids) - 1, len(ctx_ids) + len(cont_ids) - 1)
        expected = sum(table[p, t].item() for p, t in zip(positions, cont_ids, strict=True))
        greedy = all(table[p].argmax().item() == t for p, t in zip(positions, cont_ids, strict=True))
        assert score.n_tokens == len(cont_ids)
        assert score.logprob_sum == pytest.approx(expected, abs=1e-4)
        assert score.is_greedy == greedy


def test_score_continuations_with_shared_prefix(lively):
    model, tok = lively
    prompts = chat(tok, system="Classify the sentiment of the movie review as positive or negative.")
    contexts = [p for p in prompts for _ in range(2)]
    continuations = ["positive", "negative"] * len(prompts)
    gen = Generator(model, tok, batch_size=4)
    plain = gen.score_continuations(contexts, continuations)
    reused = gen.score_continuations(contexts, continuations, shared_prefix="auto")
    for a, b in zip(plain, reused, strict=True):
        assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)
        assert (a.n_tokens, a.is_greedy) == (b.n_tokens, b.is_greedy)


def test_score_is_greedy_for_the_greedy_continuation(lively):
    model, tok = lively
    prompt = chat(tok)[4]
    gen = Generator(model, tok)
    out = gen.generate([prompt], SamplingParams(max_new_tokens=4))[0]
    # The context ends inside the completion, not on whitespace (which would move to the continuation).
    context, continuation = prompt + tok.decode(out.token_ids[:1]), tok.decode(out.token_ids[1:3])
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    assert tok(context + continuation, add_special_tokens=False).input_ids == prompt_ids + out.token_ids[:3]
    score = gen.score_continuations([context], [continuation])[0]
    assert score.is_greedy and score.n_tokens == 2
    assert not gen.score_continuations([context], [tok.decode(out.token_ids[2:4])])[0].is_greedy


def test_empty_continuation_scores_zero(lively):
    model, tok = lively
    assert Generator(model, tok).score_continuations(["abc"], [""])[0].n_tokens == 0


# ------------------------------------------------------------------------------------- runners and the model


def test_decoder_runner_is_chosen_for_llama_and_matches_the_transformers_runner(lively):
    model, tok = lively
    gen = Generator(model, tok, batch_size=3)
    assert gen.runner_name == "decoder"
    slow = Generator(model, tok, batch_size=3)
    slow._runner = HFRunner(model)
    prompts = chat(tok, system="You are a helpful assistant.")
    params = SamplingParams(max_new_tokens=10)
    for shared in (None, "auto"):
        assert ([o.token_ids for o in gen.generate(prompts, params, shared_prefix=shared)]
                == [o.token_ids for o in slow.generate(prompts, params, shared_prefix=shared)])
    a = gen.score_continuations(prompts, ["yes"] * len(prompts), shared_prefix="auto")
    b = slow.score_continuations(prompts, ["yes"] * len(prompts), shared_prefix="auto")
    assert [s.logprob_sum for s in a] == pytest.approx([s.logprob_sum for s in b], abs=1e-4)


def _eager_record(calls: list):
    """A stand-in for `DecodeGraph.record` on a CPU: the recording is an eager re-run writing into one buffer."""

    def record(run):
        calls.append(1)
        out = run().clone()
        return out, lambda: out.copy_(run())

    return record


@pytest.mark.parametrize("shared", [None, "auto"])
def test_fixed_shape_decoding_steps_equal_the_eager_ones(lively, monkeypatch, shared):
    """The decoding step in fixed shapes (`forward(slot=...)`: keys and values written at a slot named by a tensor,
    attention over every slot of the cache, the unwritten ones masked), driven by `DecodeGraph` as a CUDA graph
    would replay it (a CPU re-runs it eagerly), gives the engine's tokens: greedy and sampled, rows of different
    prompt lengths, with and without a shared prefix, rows finishing early (a graph keeps its batch)."""
    from honellm.core.runners import DecodeGraph

    model, tok = lively
    prompts = chat(tok, system="You are a helpful assistant.")
    plain = Generator(model, tok, batch_size=4)
    graphed = Generator(model, tok, batch_size=4)
    calls = []
    monkeypatch.setattr(DecodeGraph, "record", staticmethod(_eager_record(calls)))
    graphed._cuda_graphs = True  # as on a GPU
    ending = plain.generate(prompts, SamplingParams(max_new_tokens=20))[1].token_ids[6]
    for gen in (plain, graphed):  # a token the model emits mid-way ends a row: rows finish at different steps
        gen.eos_ids = {*gen.eos_ids, ending}
    lengths = set()
    for params in (SamplingParams(max_new_tokens=20), SamplingParams(max_new_tokens=20, temperature=0.9, seed=7)):
        want = plain.generate(prompts, params, shared_prefix=shared)
        got = graphed.generate(prompts, params, shared_prefix=shared)
        assert [o.token_ids for o in got] == nontrivial(want, 1, varied=3)
        assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
        lengths |= {len(o.token_ids) for o in want}
    assert len(calls) == 4 and graphed._runner.graphs_problem is None  # a recording per batch (2 batches x 2)
    assert graphed.decoding == "decoder, CUDA graphs" and plain.decoding == "decoder"
    assert len(lengths) > 1  # some rows ended before others


def test_a_recording_that_differs_falls_back_to_eager_decoding(lively, monkeypatch):
    from honellm.core.runners import DecodeGraph

    model, tok = lively
    prompts, params = chat(tok)[:3], SamplingParams(max_new_tokens=18)
    want = [o.token_ids for o in Generator(model, tok, batch_size=3).generate(prompts, params)]
    calls = []

    def wrong(run):  # a recording that replays something else
        calls.append(1)
        out = run().clone()
        return out, lambda: out.zero_()

    monkeypatch.setattr(DecodeGraph, "record", staticmethod(wrong))
    gen = Generator(model, tok, batch_size=3)
    gen._cuda_graphs = True
    assert [o.token_ids for o in gen.generate(prompts, params)] == want
    assert "other logits" in gen._runner.graphs_problem and len(calls) == 1
    assert gen.decoding.startswith("decoder, CUDA graphs off: the replayed decoding step gave other logits")
    assert [o.token_ids for o in gen.generate(prompts, params)] == want and len(calls) == 1  # not tried again
    few = Generator(model, tok, batch_size=3)
    few._cuda_graphs = True
    few.generate(prompts, SamplingParams(max_new_tokens=8))  # too few steps to pay for a recording
    assert len(calls) == 1


def _tiny_config(kind: str, vocab: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if kind == "mistral":
        return MistralConfig(sliding_window=None, **common)
    return LlamaConfig(attention_bias=True, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                             "rope_theta": 10000.0}, **common)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral", "llama-bias-scaled-rope"])
def test_decoder_runner_matches_transformers_on_other_llama_like_models(tiny_model, kind):
    from transformers import AutoModelForCausalLM

    _, tok = tiny_model
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(kind, len(tok))).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)  # biases and norms away from their initial values too
    assert DecoderRunner.unsupported(model) is None
    prompts = chat(tok)
    fast, slow = Generator(model, tok, batch_size=3), Generator(model, tok, batch_size=3)
    slow._runner = HFRunner(model)
    params = SamplingParams(max_new_tokens=8, logprobs=True)
    slow_outs = slow.generate(prompts, params)
    nontrivial(slow_outs, 8)
    for a, b in zip(fast.generate(prompts, params, shared_prefix="auto"), slow_outs, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_sliding_window_models_use_the_transformers_runner(tiny_model):
    from transformers import AutoModelForCausalLM, MistralConfig

    _, tok = tiny_model
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=16)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = Generator(model, tok)
    assert gen.runner_name == "transformers"
    prompt = chat(tok)[3]  # longer than the window
    out = gen.generate([prompt], SamplingParams(max_new_tokens=6))[0]
    assert nontrivial([out], 6) == [reference_greedy(model, tok, prompt, 6)]


def test_peft_lora_model_matches_its_own_generate(lively):
    from peft import LoraConfig, get_peft_model

    model, tok = lively
    torch.manual_seed(3)  # the adapter's random initialisation, the same whichever tests ran before
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                                  lora_dropout=0.5, init_lora_weights=False))
    peft_model.eval()
    prompts = chat(tok)[:3]
    gen = Generator(peft_model, tok, batch_size=3)
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=10))
    base = Generator(model, tok, batch_size=3).generate(prompts, SamplingParams(max_new_tokens=10))
    assert nontrivial(outs, 10) != nontrivial(base, 10, varied=2)  # the adapter changes the outputs
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == reference_greedy(peft_model, tok, prompt, 10)
    # A model left in training mode (dropout on) generates as in eval mode, and stays in training mode.
    peft_model.train()
    again = gen.generate(prompts, SamplingParams(max_new_tokens=10))
    assert peft_model.training
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]


def test_lora_layers_decode_merged_and_follow_training_and_disabling(lively):
    """LoRA layers enter the derived weights merged (W + s B A): outputs equal PEFT's own forward, an adapter
    updated in place (an optimizer step) is seen, and a disabled adapter gives the base model back."""
    from peft import LoraConfig, get_peft_model

    model, tok = lively
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=targets,
                                                                  init_lora_weights=False)).eval()
    prompts = chat(tok)[:3]
    gen = Generator(peft_model, tok, batch_size=3)
    params = SamplingParams(max_new_tokens=8)
    outs = nontrivial(gen.generate(prompts, params), 8)
    layer = gen._runner.derived.layers[0]
    assert all(w is not None for w in (layer.qkv, layer.o, layer.gate_up, layer.down))  # merged, not bypassed
    assert outs == [reference_greedy(peft_model, tok, p, 8) for p in prompts]
    with torch.no_grad():  # what an optimizer step does: in-place updates of the adapter only
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(-3.0)
    updated = nontrivial(gen.generate(prompts, params), 8)
    assert updated != outs and updated == [reference_greedy(peft_model, tok, p, 8) for p in prompts]
    base = nontrivial(Generator(model, tok, batch_size=3).generate(prompts, params), 8, varied=1)
    with peft_model.disable_adapter():
        assert [o.token_ids for o in gen.generate(prompts, params)] == base
    assert [o.token_ids for o in gen.generate(prompts, params)] == updated


def test_merge_adapters_off_leaves_lora_layers_to_their_forward(lively):
    from peft import LoraConfig, get_peft_model

    model, tok = lively
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "up_proj"],
                                                                  init_lora_weights=False)).eval()
    gen = Generator(peft_model, tok, merge_adapters=False)
    prompt = chat(tok)[1]
    out = nontrivial(gen.generate([prompt], SamplingParams(max_new_tokens=8)), 8)[0]
    layer = gen._runner.derived.layers[0]
    assert layer.qkv is None and layer.gate_up is None and layer.o is not None and layer.down is not None
    assert out == reference_greedy(peft_model, tok, prompt, 8)


@pytest.fixture
def gpu_policy(monkeypatch):
    """The CPU standing in for a GPU in the derived weights' policy, with `free` bytes of GPU memory free."""
    from honellm.core import runners

    memory = {"free": 10**12}
    monkeypatch.setattr(runners, "_on_gpu", lambda device: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (memory["free"], 10**12))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    return memory


def _decode_operations(gen, prompts, params) -> tuple[list[list[int]], int]:
    """The token ids `gen` generates and the ATen operations dispatched in the call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        outs = gen.generate(prompts, params)
    return [o.token_ids for o in outs], Count.n


def test_on_a_gpu_a_training_lora_policy_decodes_merged_and_gives_the_copies_back(lively, gpu_policy):
    """GPU policy (a CPU standing in): a LoRA policy being trained (GRPO's rollouts) decodes through merged
    derived weights, the same tokens as through its LoRA layers with far fewer operations (each about a kernel
    launch, which bounds a small model's decoding step on a GPU), and gives the copies back after each call; a
    frozen model keeps them between calls; where they do not fit in half the free memory, the layers run."""
    from peft import LoraConfig, get_peft_model

    from honellm.core import fused

    model, tok = lively
    torch.manual_seed(3)
    policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    fused.install(policy)  # as the RL recipes do
    policy.train()
    prompts, params = chat(tok)[:3], SamplingParams(max_new_tokens=8)
    gen = Generator(policy, tok, batch_size=3)
    built = []
    forward = gen._runner.forward

    def spy(*args, **kwargs):
        built.append(gen._runner.derived.layers is not None)
        return forward(*args, **kwargs)

    gen._runner.forward = spy
    merged, merged_operations = _decode_operations(gen, prompts, params)
    assert built and all(built) and gen._runner.derived.layers is None  # merged during the call, given back after
    assert policy.training  # and its training mode back

    gpu_policy["free"] = 1000  # nothing fits: the LoRA layers run
    built.clear()
    unmerged, unmerged_operations = _decode_operations(gen, prompts, params)
    assert built and not any(built)
    assert merged == unmerged == [reference_greedy(policy, tok, p, 8) for p in prompts]
    assert merged_operations < 0.6 * unmerged_operations

    gpu_policy["free"] = 10**12
    for param in policy.parameters():  # a frozen model (evaluation, serving) keeps its copies between calls
        param.requires_grad_(False)
    gen.generate(prompts, params)
    kept = gen._runner.derived.layers
    assert kept is not None
    gen.generate(prompts, params)
    assert gen._runner.derived.layers is kept  # nothing changed: the probes (gathered per dtype on a GPU) agree
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data.mul_(-3.0)  # a write that bumps no version counter: only the probed values show it
    changed = [o.token_ids for o in gen.generate(prompts, params)]
    assert gen._runner.derived.layers is not kept
    assert changed != merged and changed == [reference_greedy(policy, tok, p, 8) for p in prompts]


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dora_model(model, seed: int = 0, **config):
    """A DoRA copy of `model` on every linear layer with random non-zero B and a magnitude moved off its initial
    value ||W + s B A|| (where the magnitude equals it, DoRA computes what LoRA computes)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=TARGETS, use_dora=True,
                                                                  init_lora_weights=False, **config)).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * torch.rand(param.shape))
    return peft_model


def runner_logprobs(runner, ids: list[int]) -> torch.Tensor:
    """Log-probs [T, vocab] of every position of `ids`, through `runner` (its derived weights brought up to date)."""
    with torch.inference_mode():
        runner.prepare()
        logits = runner.forward(runner.new_state(1, len(ids)), torch.tensor([ids]), torch.arange(len(ids))[None],
                                torch.ones(1, len(ids), dtype=torch.bool), keep=len(ids))
    return logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_layers_decode_folded_as_peft_merges_them(lively, dtype):
    """DoRA layers enter the derived weights folded with PEFT's DoRA merge (m / ||W + s B A|| * (W + s B A), fp32,
    rounded once): log-probs equal PEFT's merged model (`merge_and_unload`) within 1e-5 in fp32, and within the
    bf16 tolerance of the derived weights in bf16; in fp32 they equal PEFT's unmerged forward too."""
    from peft.tuners.lora import LoraLayer

    model, tok = lively
    peft_model = dora_model(model).to(dtype)
    gen = Generator(peft_model, tok)
    assert gen.runner_name == "decoder"
    runner = gen._runner
    ids = tok(chat(tok)[1], add_special_tokens=False).input_ids
    got = runner_logprobs(runner, ids)
    for layer in runner.derived.layers:  # every product folded, none left to PEFT's DoRA forward
        assert all(w is not None for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
    assert sum(isinstance(m, LoraLayer) and bool(m.lora_magnitude_vector) for m in peft_model.modules()) == 14
    with torch.no_grad():
        unmerged = full_logprobs(peft_model, ids)
        merged = full_logprobs(copy.deepcopy(peft_model).merge_and_unload(), ids)
    base = full_logprobs(copy.deepcopy(model).to(dtype), ids)
    assert (merged - base).abs().max() > 0.05  # the adapter changes the outputs
    if dtype == torch.float32:
        torch.testing.assert_close(got, merged, rtol=0, atol=1e-5)
        torch.testing.assert_close(got, unmerged, rtol=0, atol=1e-5)
        prompts = chat(tok)[:3]
        outs = nontrivial(Generator(peft_model, tok, batch_size=3).generate(prompts, SamplingParams(max_new_tokens=8)), 8)
        assert outs == [reference_greedy(peft_model, tok, p, 8) for p in prompts]
    else:
        assert torch.allclose(got, merged, atol=0.05, rtol=0.02)
        assert (got.argmax(-1) == merged.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("tensor", ["lora_B", "lora_magnitude_vector"])
def test_dora_fold_follows_updates_of_the_adapter(lively, tensor):
    """An in-place update of a DoRA adapter's B or magnitude (what an optimizer step does) rebuilds the fold: the
    next call's numbers change, and equal PEFT's forward again."""
    model, tok = lively
    peft_model = dora_model(model)
    gen = Generator(peft_model, tok, batch_size=3)
    prompts = chat(tok)[:3]
    params = SamplingParams(max_new_tokens=8)
    ids = tok(prompts[1], add_special_tokens=False).input_ids
    before = runner_logprobs(gen._runner, ids)
    outs = nontrivial(gen.generate(prompts, params), 8)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if tensor in name:
                param.mul_(-3.0 if tensor == "lora_B" else 0.5 + torch.rand(param.shape))
    updated = nontrivial(gen.generate(prompts, params), 8)
    assert updated != outs and updated == [reference_greedy(peft_model, tok, p, 8) for p in prompts]
    after = runner_logprobs(gen._runner, ids)
    assert (after - before).abs().max() > 0.05
    torch.testing.assert_close(after, full_logprobs(peft_model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["bias_on_b", "two_adapters", "unmerged_by_choice"])
def test_dora_layers_that_must_not_fold_run_through_their_own_forward(lively, case):
    """DoRA with a bias on B (PEFT's config refuses `lora_bias` with DoRA; set by hand here), two active adapters,
    or an engine asked not to merge: those layers run as modules (PEFT's forward), with PEFT's numbers."""
    from peft import LoraConfig

    model, tok = lively
    peft_model = dora_model(model)
    if case == "bias_on_b":
        torch.manual_seed(1)
        for module in peft_model.modules():
            if hasattr(module, "lora_magnitude_vector") and module.lora_magnitude_vector:
                lora_b = module.lora_B["default"]
                lora_b.bias = torch.nn.Parameter(torch.randn(lora_b.out_features) * 0.1)
    if case == "two_adapters":
        torch.manual_seed(1)
        peft_model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "up_proj"], use_dora=True,
                                                   init_lora_weights=False))
        peft_model.base_model.set_adapter(["default", "other"])
    peft_model.eval()
    gen = Generator(peft_model, tok, merge_adapters=case != "unmerged_by_choice")
    ids = tok(chat(tok)[1], add_special_tokens=False).input_ids
    got = runner_logprobs(gen._runner, ids)
    layer = gen._runner.derived.layers[0]
    if case == "two_adapters":  # q and up carry both adapters, the other layers only the first (folded)
        assert layer.qkv is None and layer.gate_up is None and layer.o is not None and layer.down is not None
    else:
        assert layer.qkv is None and layer.gate_up is None and layer.o is None and layer.down is None
    torch.testing.assert_close(got, full_logprobs(peft_model, ids), rtol=0, atol=1e-5)


def test_dora_with_dropout_folds_only_in_eval_mode(lively):
    """PEFT's DoRA forward applies dropout in training mode (not a fixed linear map then, so no fold) and skips it in
    eval mode; the engine decodes in eval mode, so a model left training still decodes folded, with PEFT's numbers."""
    model, tok = lively
    peft_model = dora_model(model, lora_dropout=0.5).train()
    gen = Generator(peft_model, tok, batch_size=3)
    gen._runner.prepare()  # outside an engine call: training mode
    assert gen._runner.derived.layers[0].qkv is None and gen._runner.derived.layers[0].down is None
    prompts = chat(tok)[:3]
    outs = nontrivial(gen.generate(prompts, SamplingParams(max_new_tokens=8)), 8)
    assert peft_model.training and gen._runner.derived.layers[0].qkv is not None
    peft_model.eval()
    assert outs == [reference_greedy(peft_model, tok, p, 8) for p in prompts]


def test_weights_updated_in_place_are_seen(lively):
    model, tok = lively
    model = copy.deepcopy(model)
    gen = Generator(model, tok)
    prompt = chat(tok)[1]
    before = nontrivial(gen.generate([prompt], SamplingParams(max_new_tokens=8)), 8)[0]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(-1.0)
    after = nontrivial(gen.generate([prompt], SamplingParams(max_new_tokens=8)), 8)[0]
    assert after != before and after == reference_greedy(model, tok, prompt, 8)


def test_weights_written_through_data_are_seen(lively):
    """`.data` writes (PEFT merging, older training code) bump no version counter; the fingerprint notices."""
    model, tok = lively
    model = copy.deepcopy(model)
    gen = Generator(model, tok)
    prompt = chat(tok)[1]
    before = nontrivial(gen.generate([prompt], SamplingParams(max_new_tokens=8)), 8)[0]
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.data.mul_(3.0)
        layer.mlp.gate_proj.weight.data.mul_(-1.0)
    after = nontrivial(gen.generate([prompt], SamplingParams(max_new_tokens=8)), 8)[0]
    assert after != before and after == reference_greedy(model, tok, prompt, 8)


@pytest.fixture(params=["tiles", "onednn"])
def product_path(request, monkeypatch):
    """Both ways the runner's bf16 products go: AMX tiles (where the native kernels run here) and oneDNN with a
    matrix-vector product for one row (everywhere else; forced here by declining the tiles)."""
    import honellm.core.runners as runners

    if request.param == "tiles" and not runners.native.amx_available():
        pytest.skip(f"no AMX kernels here: {runners.native.status()}")
    if request.param == "onednn":
        monkeypatch.setattr(runners.native, "pack", lambda weight: None)
    return request.param


def test_derived_weights_in_bf16_give_the_module_outputs(lively, product_path, monkeypatch):
    """Fused and packed bf16 weights (AMX tiles, or oneDNN's blocked layout) compute what the model's own modules
    compute; with tiles, every product of the many-row forward is counted going through the native kernel."""
    import honellm.core.runners as runners

    model, tok = lively
    model = copy.deepcopy(model).to(torch.bfloat16)
    runner = DecoderRunner(model)
    ids = torch.tensor([tok(p, add_special_tokens=False).input_ids[:12] for p in chat(tok)[1:5]])
    positions = torch.arange(12)[None].expand(4, 12)
    valid = torch.ones(4, 12, dtype=torch.bool)
    with torch.inference_mode():
        plain = runner.forward(runner.new_state(4, 12), ids, positions, valid, keep=12)
        runner.prepare()
        assert runner.derived.layers is not None and runner.derived.layers[0].qkv is not None
        assert (runner.derived.layers[0].qkv.tiles is not None) == (product_path == "tiles")
        tiles = []
        real_matmul = runners.native.matmul
        monkeypatch.setattr(runners.native, "matmul", lambda *a: tiles.append(1) or real_matmul(*a))
        derived = runner.forward(runner.new_state(4, 12), ids, positions, valid, keep=12)
        reference = model(ids).logits
    # 4 products a layer (qkv, o, gate-up, down) and the head: all through the tiles, or none
    assert len(tiles) == (4 * model.config.num_hidden_layers + 1 if product_path == "tiles" else 0)
    assert torch.allclose(derived.float(), plain.float(), atol=0.05, rtol=0.02)
    assert torch.allclose(derived.float(), reference.float(), atol=0.05, rtol=0.02)
    assert (derived.argmax(-1) == reference.argmax(-1)).float().mean() > 0.95


def test_one_row_products_agree_with_the_modules(lively, product_path, monkeypatch):
    """A batch-1 decoding step matches the module outputs. Without tiles it takes a matrix-vector product over
    row-major weights (the blocked layout serves many rows), and every derived matrix has a row-major form; with
    tiles, every product goes through them."""
    import honellm.core.runners as runners

    model, tok = lively
    model = copy.deepcopy(model).to(torch.bfloat16)
    runner = DecoderRunner(model)
    runner.prepare()
    layer = runner.derived.layers[0]
    derived = (layer.qkv, layer.o, layer.gate_up, layer.down, runner.derived.lm_head)
    if product_path == "tiles":
        assert all(w.tiles is not None and w.blocked is None and w.rows is None for w in derived)
    else:
        assert all(w.rows is not None and not w.rows.is_mkldnn for w in derived)
    ids = tok(chat(tok)[1], add_special_tokens=False).input_ids[:10]
    calls = {"mv": 0, "tiles": 0}
    real_mv, real_matmul = runners.native.mv, runners.native.matmul
    monkeypatch.setattr(runners.native, "mv", lambda *a: calls.__setitem__("mv", calls["mv"] + 1) or real_mv(*a))
    monkeypatch.setattr(runners.native, "matmul",
                        lambda *a: calls.__setitem__("tiles", calls["tiles"] + 1) or real_matmul(*a))
    products = 4 * model.config.num_hidden_layers + 1
    with torch.inference_mode():
        state = runner.new_state(1, 11)
        runner.forward(state, torch.tensor([ids[:9]]), torch.arange(9)[None], torch.ones(1, 9, dtype=torch.bool), 1)
        # a prefill of 9 rows takes the many-row path; its one kept row, the head's one-row product
        assert calls == ({"mv": 0, "tiles": products} if product_path == "tiles" else {"mv": 1, "tiles": 0})
        calls.update(mv=0, tiles=0)
        step = runner.forward(state, torch.tensor([ids[9:10]]), torch.tensor([[9]]), torch.ones(1, 1, dtype=torch.bool), 1)
        reference = model(torch.tensor([ids])).logits[:, -1:]
    assert calls == ({"mv": 0, "tiles": products} if product_path == "tiles" else {"mv": products, "tiles": 0})
    assert torch.allclose(step.float(), reference.float(), atol=0.05, rtol=0.02)
    assert step.argmax(-1).item() == reference.argmax(-1).item()


def test_prompt_learning_adapters_are_refused(lively):
    from peft import PromptTuningConfig, get_peft_model

    model, tok = lively
    peft_model = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(HoneError, match="prompt-learning"):
        Generator(peft_model, tok)


# ------------------------------------------------------------------------------------------------------- vLLM


def test_vllm_is_not_selected_when_unavailable(lively, monkeypatch):
    import importlib.util

    model, tok = lively
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    assert select_backend("auto", model) == "torch"
    assert Generator(model, tok).backend == "torch"
    with pytest.raises(MissingDependency, match="vllm"):
        Generator(model, tok, backend="vllm")


def test_vllm_needs_a_gpu_even_when_installed(lively, monkeypatch):
    import importlib.util

    model, _ = lively
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_backend("auto", model) == "torch"
    with pytest.raises(HoneError, match="CUDA"):
        select_backend("vllm", model)


def test_unknown_backend_is_a_user_error(lively):
    model, tok = lively
    with pytest.raises(HoneError, match="unknown generation backend"):
        Generator(model, tok, backend="tensorrt")


# ---------------------------------------------------------------------------------------- constrained decoding


ANSWER_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["label", "score", "tags"],
                 "properties": {"label": {"enum": ["positive", "negative"]},
                                "score": {"type": "integer", "minimum": 0, "maximum": 9},
                                "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 4}}}}


def validate_schema(value, schema) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(value, schema)


def test_json_schema_grammar_gives_valid_json_from_random_weights(lively):
    """With random weights only the grammar can make the answer valid: every row parses and validates, and each
    row's mask is its own (a batch gives each prompt what it gives alone, greedy)."""
    pytest.importorskip("llguidance")
    import json

    from honellm.generation.params import Grammar

    model, tok = lively
    gen = Generator(model, tok, batch_size=4)
    prompts = chat(tok)[:4]
    for params in (SamplingParams(max_new_tokens=64, grammar=Grammar.json_schema(ANSWER_SCHEMA)),
                   SamplingParams(max_new_tokens=64, temperature=1.0, seed=5, grammar=Grammar.json_schema(ANSWER_SCHEMA))):
        outs = gen.generate(prompts, params)
        for out in outs:
            assert out.finish_reason == FINISH_STOP, out
            validate_schema(json.loads(out.text), ANSWER_SCHEMA)
            assert out.token_ids[-1] not in gen.eos_ids  # the grammar ended the row, not an end-of-turn token
        if params.greedy:
            alone = [gen.generate([p], params)[0].text for p in prompts]
            assert alone == [o.text for o in outs]
    unconstrained = gen.generate(prompts[:1], SamplingParams(max_new_tokens=16))[0].text
    assert not unconstrained.startswith("{")  # the model does not write JSON by itself


def test_grammar_logprobs_are_the_raw_models(lively):
    """The mask changes which token is chosen, not the reported distribution (vLLM's default)."""
    pytest.importorskip("llguidance")
    from honellm.generation.params import Grammar

    model, tok = lively
    prompt = chat(tok)[1]
    out = Generator(model, tok).generate([prompt], SamplingParams(max_new_tokens=20, top_logprobs=2,
                                                                  grammar=Grammar("regex", "[0-9]{3}")))[0]
    assert out.text.isdigit() and len(out.text) == 3
    ids = tok(prompt, add_special_tokens=False).input_ids
    table = full_logprobs(model, ids + out.token_ids)
    expected = [table[len(ids) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)


def test_invalid_grammars_are_clear_errors(lively):
    pytest.importorskip("llguidance")
    from honellm.generation.constrained import check_json_schema
    from honellm.generation.params import Grammar

    with pytest.raises(HoneError, match="JSON schema"):
        check_json_schema({"type": "wat"})
    model, tok = lively
    with pytest.raises(HoneError, match="Lark grammar"):
        Generator(model, tok).generate(["hi"], SamplingParams(grammar=Grammar("lark", "start: nope")))
    with pytest.raises(HoneError, match="grammar kind"):
        Grammar("yaml", "x")
