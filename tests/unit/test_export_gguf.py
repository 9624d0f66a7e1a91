"""`export --format gguf`: the GGUF loads back in transformers (`gguf_file=`) with the merged model's logits (f32
exactly, f16 and q8_0 within the tolerances below), its tokenizer gives the same ids, the chat template is in the
file, the Ollama Modelfile carries the prompt program, and what llama.cpp cannot take is refused clearly.

Tolerances, on the tiny random models (logits of magnitude ~1): f16 5e-3 and q8_0 5e-2 max-abs-diff (measured
about 2e-4 and 7e-3); docs/export.md has the embedded model's figures.
"""

from __future__ import annotations

import json

import gguf
import pytest
import torch

from honellm.artifact import Artifact
from honellm.errors import HoneError
from honellm.export import export_artifact, export_gguf
from honellm.export_gguf import ARCHITECTURES, check_quants, supported_architecture
from honellm.program import Demonstration, PromptProgram
from honellm.testing import make_tiny_arch_model, make_tiny_task
from honellm.tuning import tune_task

TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "q8_0": 5e-2}
SAMPLES = ["<|im_start|>system\nClassify the review.<|im_end|>\n<|im_start|>user\nReview: a warm film<|im_end|>\n"
           "<|im_start|>assistant\n", "The quick brown fox jumps over 123 lazy dogs!\n  Ünïcödé 🎉"]


@pytest.fixture(scope="module")
def lora_artifact(tiny_model_dir, tmp_path_factory):
    task = make_tiny_task(tmp_path_factory.mktemp("task"), tiny_model_dir)
    out = tmp_path_factory.mktemp("lora") / "run"
    return tune_task(str(task), "lora", ["max_steps=3", "eval_every=0", "lr=2e-2"], out=str(out))


def _compare(out, merged_dir, quants, probe=SAMPLES[0]):
    """Max-abs logit difference per quant between the GGUF (loaded by transformers) and the merged folder on
    `probe`; the tokenizers must agree on every sample."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((out / "hone-export.json").read_text())
    reference = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = tokenizer(probe, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference(ids).logits
    diffs = {}
    for quant in quants:
        name = info["files"][quant]["file"]
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
        with torch.no_grad():
            diffs[quant] = (model(ids).logits - expected).abs().max().item()
        loaded = AutoTokenizer.from_pretrained(out, gguf_file=name)
        for text in SAMPLES:
            assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], (quant, text)
    return diffs


def test_gguf_of_a_lora_artifact_gives_the_merged_models_logits(lora_artifact, tmp_path):
    merged = export_artifact(lora_artifact.path, tmp_path / "merged", dtype="fp32")
    out = export_artifact(lora_artifact.path, tmp_path / "gguf", format="gguf", quants=["f16", "q8_0", "f32"])
    info = json.loads((out / "hone-export.json").read_text())
    assert set(info["files"]) == {"f16", "q8_0", "f32"} and info["format"] == "gguf"
    assert not (out / ".merged").exists()
    sizes = {q: f["bytes"] for q, f in info["files"].items()}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    diffs = _compare(out, merged, ["f32", "f16", "q8_0"])
    for quant, diff in diffs.items():
        assert diff <= TOLERANCE[quant], (quant, diff)
    assert diffs["f16"] > 0  # rounding happened: it is not the f32 file twice

    reader = gguf.GGUFReader(out / info["files"]["q8_0"]["file"])
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt2"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied embeddings are stored once
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(tok) and tokens[tok.eos_token_id] == tok.eos_token
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    assert fields["tokenizer.ggml.token_type"].contents()[tok.convert_tokens_to_ids("<|im_start|>")] == 3  # CONTROL

    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{info['files']['f16']['file']}" in modelfile
    assert 'SYSTEM """Classify the review."""' in modelfile and "Review: {text}" in modelfile
    assert "PARAMETER temperature 0.0" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert f"FROM ./{info['files']['q8_0']['file']}" in (out / "Modelfile.q8_0").read_text()
    assert "llama-cli" in (out / "README.md").read_text()
    with pytest.raises(HoneError, match="already exists"):
        export_artifact(lora_artifact.path, out, format="gguf")


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_llama_family_architectures_round_trip(arch, tmp_path):
    model_dir = make_tiny_arch_model(tmp_path / arch, arch)
    program = PromptProgram(system="Answer briefly.", demonstrations=[Demonstration(query="2+2?", answer="4")])
    art = Artifact.create(name=f"tiny-{arch}", method="few_shot", base_model=str(model_dir), program=program)
    out = export_gguf(art, tmp_path / "gguf", quants=["f32", "q8_0"])
    # Mistral's sliding window (8 tokens here) is not in a llama.cpp file (its converter drops it too): compare
    # within the window, and the export says so.
    probe = "brown fox" if arch == "mistral" else SAMPLES[0]  # 5 tokens: within the window
    diffs = _compare(out, model_dir, ["f32", "q8_0"], probe)
    assert diffs["f32"] <= TOLERANCE["f32"] and diffs["q8_0"] <= TOLERANCE["q8_0"], diffs
    info = json.loads((out / "hone-export.json").read_text())
    assert any("sliding window" in n for n in info["notes"]) == (arch == "mistral")
    reader = gguf.GGUFReader(out / info["files"]["f32"]["file"])
    assert reader.fields["general.architecture"].contents() == ARCHITECTURES[arch].gguf_arch
    modelfile = (out / "Modelfile").read_text()
    assert 'MESSAGE user """2+2?"""' in modelfile and 'MESSAGE assistant """4"""' in modelfile
    assert modelfile.index("SYSTEM") < modelfile.index("MESSAGE user")


def test_unsupported_architectures_and_quants_are_refused(tmp_path):
    with pytest.raises(HoneError, match="'gpt2' architecture") as info:
        supported_architecture({"model_type": "gpt2"}, where="x")
    assert "llama, mistral, qwen2" in info.value.fix
    with pytest.raises(HoneError, match="k-quants") as info:
        check_quants(["q3_k_m"])
    assert "llama-quantize" in info.value.fix and "q8_0" in info.value.fix
    with pytest.raises(HoneError, match="unknown quantisation"):
        check_quants(["q3"])
    assert check_quants([]) == ["q8_0"] and check_quants(["F16", "Q8_0"]) == ["f16", "q8_0"]
    assert check_quants(["Q4_K_M", "q6_k"]) == ["q4_k_m", "q6_k"]
    model_dir = make_tiny_arch_model(tmp_path / "gpt2", "gpt2")
    art = Artifact.create(name="tiny-gpt2", method="zero-shot", base_model=str(model_dir), program=PromptProgram())
    with pytest.raises(HoneError, match="does not support"):
        export_gguf(art, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_quant_block_that_does_not_fit_falls_back_to_f16(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from honellm.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.chat_template = None
    config = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model_dir = tmp_path / "odd"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    art = Artifact.create(name="odd", method="zero-shot", base_model=str(model_dir), program=PromptProgram())
    out = export_gguf(art, tmp_path / "gguf", quants=["q8_0"])
    info = json.loads((out / "hone-export.json").read_text())
    assert any("F16" in n and "blk.0.ffn_down.weight" in n for n in info["notes"])  # rows of 80: not 32-blocks
    reader = gguf.GGUFReader(out / info["files"]["q8_0"]["file"])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["output.weight"] == "F16"  # 48 is not a 32-multiple
    diffs = _compare(out, model_dir, ["q8_0"])
    assert diffs["q8_0"] <= TOLERANCE["q8_0"]


def test_k_quant_mixtures_give_each_tensor_llama_cpps_type(tmp_path):
    """q4_k_m of a tiny 8-layer llama: the types llama.cpp's llama_tensor_get_type gives (attn_v and ffn_down Q6_K
    on the use_more_bits layers 0, 3, 6 and 7, output Q6_K, the rest Q4_K), the 256-fallbacks for ffn_down's rows
    of 288 (Q4_K -> Q5_0, Q6_K -> Q8_0), MOSTLY_Q4_K_M, and logits near the model's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from honellm.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=288, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model_dir = tmp_path / "k"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    art = Artifact.create(name="k", method="zero-shot", base_model=str(model_dir), program=PromptProgram())
    out = export_gguf(art, tmp_path / "gguf", quants=["q4_k_m", "q6_k", "q8_0"])
    info = json.loads((out / "hone-export.json").read_text())
    reader = gguf.GGUFReader(out / info["files"]["q4_k_m"]["file"])
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    more_bits = {0, 3, 6, 7}
    for layer in range(8):
        assert types[f"blk.{layer}.attn_v.weight"] == ("Q6_K" if layer in more_bits else "Q4_K")
        assert types[f"blk.{layer}.ffn_down.weight"] == ("Q8_0" if layer in more_bits else "Q5_0")  # 288 columns
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{layer}.{name}.weight"] == "Q4_K"
        assert types[f"blk.{layer}.attn_norm.weight"] == "F32"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert any("q4_k_m: 8 tensors" in n and "Q5_0/Q8_0" in n and "blk.0.ffn_down.weight (Q8_0)" in n for n in info["notes"])
    q6 = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / info["files"]["q6_k"]["file"]).tensors}
    assert q6["blk.1.attn_q.weight"] == "Q6_K" and q6["blk.1.ffn_down.weight"] == "Q8_0"
    diffs = _compare(out, model_dir, ["q4_k_m", "q6_k", "q8_0"])
    # measured max abs logit differences: q8_0 0.013, q6_k 0.052, q4_k_m 0.18 (Q6_K's RMS error is ~3x Q8_0's)
    assert diffs["q8_0"] < diffs["q6_k"] < diffs["q4_k_m"] <= 0.4 and diffs["q6_k"] <= 0.1, diffs


def test_k_quant_types_for_tied_embeddings_and_odd_rows():
    from honellm.export_gguf import k_quant_tensor_type

    # SmolLM2-135M: hidden 576 is not a multiple of 256; its token embedding is tied to the output
    assert k_quant_tensor_type("q4_k_m", "token_embd.weight", 576, 30, tied=True) == ("Q8_0", False)
    assert k_quant_tensor_type("q4_k_m", "token_embd.weight", 576, 30, tied=False) == ("Q5_0", True)
    assert k_quant_tensor_type("q4_k_m", "token_embd.weight", 512, 30, tied=True) == ("Q6_K", False)
    assert k_quant_tensor_type("q4_k_m", "blk.0.attn_q.weight", 576, 30, tied=True) == ("Q5_0", True)
    assert k_quant_tensor_type("q5_k_m", "blk.0.attn_q.weight", 576, 30, tied=True) == ("Q5_1", True)
    assert k_quant_tensor_type("q4_k_m", "blk.2.attn_v.weight", 576, 30, tied=True) == ("Q8_0", True)  # 2 < 30 // 8
    assert k_quant_tensor_type("q4_k_m", "blk.4.attn_v.weight", 512, 30, tied=True) == ("Q4_K", False)
    assert k_quant_tensor_type("q4_k_m", "blk.5.ffn_down.weight", 1536, 30, tied=True) == ("Q6_K", False)
    assert k_quant_tensor_type("q5_k_s", "blk.5.ffn_down.weight", 1536, 30, tied=True) == ("Q5_K", False)
    # q4_k_s: attn_v of layers 0-3 and ffn_down of the first eighth (30 // 8 = 3 layers) get Q5_K
    assert k_quant_tensor_type("q4_k_s", "blk.3.attn_v.weight", 512, 30, tied=True) == ("Q5_K", False)
    assert k_quant_tensor_type("q4_k_s", "blk.4.attn_v.weight", 512, 30, tied=True) == ("Q4_K", False)
    assert k_quant_tensor_type("q4_k_s", "blk.2.ffn_down.weight", 512, 30, tied=True) == ("Q5_K", False)
    assert k_quant_tensor_type("q4_k_s", "blk.3.ffn_down.weight", 512, 30, tied=True) == ("Q4_K", False)
    # rows of 80 split into neither 256- nor 32-blocks: F16, as llama.cpp does
    assert k_quant_tensor_type("q6_k", "blk.0.ffn_down.weight", 80, 30, tied=True) == ("F16", True)
    assert k_quant_tensor_type("q6_k", "output.weight", 48, 30, tied=False) == ("F16", True)
