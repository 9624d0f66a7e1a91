"""Grammar-constrained decoding and top_logprobs on the embedded model's real 49,152-token vocabulary (byte-level
BPE with merged pieces like '":"' or '{"'), where a token can cross JSON's structural characters."""

from __future__ import annotations

import json

import pytest
import torch

from honellm.generation import Generator, Grammar, SamplingParams

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["sentiment", "confidence", "keywords"],
          "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                         "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
                         "keywords": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 16}}}}


@pytest.fixture(scope="module")
def embedded(embedded_model_dir):
    from honellm.models import load

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster on a shared CPU
    yield load(embedded_model_dir, dtype="fp32", device="cpu")
    torch.set_num_threads(before)


def prompts(tok, texts):
    return [tok.apply_chat_template([{"role": "user", "content": f"Sentiment of this review, as JSON: {t}"}],
                                    tokenize=False, add_generation_prompt=True) for t in texts]


def test_json_schema_answers_validate_on_a_real_vocabulary(embedded):
    model, tok = embedded
    gen = Generator(model, tok, backend="torch", batch_size=4)
    batch = prompts(tok, ["a gripping, funny and warm film", "dull and far too long", "fine, I guess",
                          "the best thing I saw this year"])
    for params in (SamplingParams(max_new_tokens=80, grammar=Grammar.json_schema(SCHEMA)),
                   SamplingParams(max_new_tokens=80, temperature=0.9, seed=2, grammar=Grammar.json_schema(SCHEMA))):
        for out in gen.generate(batch, params):
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), SCHEMA)


def test_top_logprobs_equal_a_forward_on_a_real_vocabulary(embedded):
    model, tok = embedded
    prompt = prompts(tok, ["a gripping, funny and warm film"])[0]
    out = Generator(model, tok, backend="torch").generate([prompt], SamplingParams(max_new_tokens=6, top_logprobs=5))[0]
    ids = tok(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        table = model(torch.tensor([ids + out.token_ids])).logits[0].float().log_softmax(-1)
    for i, alternatives in enumerate(out.top_logprobs):
        values, top = table[len(ids) - 1 + i].topk(5)
        assert [a[0] for a in alternatives] == top.tolist()
        assert [a[1] for a in alternatives] == pytest.approx(values.tolist(), abs=1e-4)
