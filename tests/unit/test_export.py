"""`export`: a merged folder that plain transformers loads gives the outputs of base + adapter; the adapter export
loads with PEFT on the base named in its config; methods that cannot merge say so."""

from __future__ import annotations

import json

import pytest
import torch

from honellm.artifact import Artifact
from honellm.errors import HoneError
from honellm.export import export_artifact
from honellm.testing import make_tiny_task
from honellm.tuning import tune_task


@pytest.fixture(scope="module")
def task_yaml(tiny_model_dir, tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("task"), tiny_model_dir)


@pytest.fixture(scope="module")
def lora_artifact(task_yaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return tune_task(str(task_yaml), "lora", ["max_steps=3", "eval_every=0", "lr=2e-2"], out=str(out))


def _probe(tokenizer):
    enc = tokenizer(["<|im_start|>system\nClassify the review.<|im_end|>\n<|im_start|>user\nReview: a warm film"
                     "<|im_end|>\n<|im_start|>assistant\n", "the quick brown fox"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def _logits(model, probe):
    return model.eval()(input_ids=probe[0], attention_mask=probe[1]).logits.float()


def test_merged_export_loads_in_plain_transformers_with_the_same_outputs(lora_artifact, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = export_artifact(lora_artifact.path, tmp_path / "merged")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "hone-export.json",
            "README.md"} <= files
    assert not any(name.startswith("adapter") for name in files)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and GenerationConfig.from_pretrained(out).eos_token_id is not None
    reference, ref_tok = Artifact.load(lora_artifact.path).load_model(dtype="fp32", device="cpu")
    probe = _probe(ref_tok)
    expected = _logits(reference, probe)
    with reference.disable_adapter():
        unadapted = _logits(reference, probe)
    assert not torch.allclose(unadapted, expected, atol=1e-3)  # the adapter does change the outputs
    torch.testing.assert_close(_logits(merged, probe), expected, atol=1e-4, rtol=1e-4)
    readme = (out / "README.md").read_text()
    assert "Classify the review." in readme and "Review: {text}" in readme
    with pytest.raises(HoneError, match="already exists"):
        export_artifact(lora_artifact.path, out)


def test_adapter_export_loads_with_peft_and_names_the_base(lora_artifact, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export_artifact(lora_artifact.path, tmp_path / "adapter", format="adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    reference, tok = Artifact.load(lora_artifact.path).load_model(dtype="fp32", device="cpu")
    probe = _probe(tok)
    torch.testing.assert_close(_logits(model, probe), _logits(reference, probe))
    assert json.loads((out / "hone-export.json").read_text())["notes"] == []


def test_prompt_tuning_cannot_merge_but_exports_its_adapter(task_yaml, tmp_path):
    art = tune_task(str(task_yaml), "prompt_tuning", ["max_steps=1", "eval_every=0"], out=str(tmp_path / "run"))
    with pytest.raises(HoneError, match="cannot be merged") as info:
        export_artifact(art.path, tmp_path / "merged")
    assert "--format adapter" in info.value.fix
    out = export_artifact(art.path, tmp_path / "adapter", format="adapter")
    notes = json.loads((out / "hone-export.json").read_text())["notes"]
    assert any("vLLM" in n and "PROMPT_TUNING" in n for n in notes)


def test_full_fine_tune_exports_merged_but_has_no_adapter(task_yaml, tmp_path):
    from transformers import AutoModelForCausalLM

    art = tune_task(str(task_yaml), "full", ["max_steps=1", "eval_every=0"], out=str(tmp_path / "run"))
    out = export_artifact(art.path, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference, tok = Artifact.load(art.path).load_model(dtype="fp32", device="cpu")
    probe = _probe(tok)
    torch.testing.assert_close(_logits(merged, probe), _logits(reference, probe))
    with pytest.raises(HoneError, match="no adapter"):
        export_artifact(art.path, tmp_path / "adapter", format="adapter")
