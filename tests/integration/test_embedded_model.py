"""The embedded default model: the converted copy equals the GGUF, and it answers a simple question."""

import torch

from honellm.defaults import embedded_gguf_path
from honellm.models import load


def test_converted_model_gives_the_gguf_logits(embedded_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    converted, _ = load(embedded_model_dir, dtype="fp32")
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = direct(ids).logits
        b = converted(ids).logits
    assert torch.equal(a, b)


def test_embedded_model_answers_a_simple_question():
    model, tok = load("smollm2-135m-instruct")
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
