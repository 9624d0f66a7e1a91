import json

import pytest

from honellm.artifact import Artifact
from honellm.errors import HoneError
from honellm.program import Demonstration, PromptProgram


def test_save_load_roundtrip_with_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from honellm.models import load

    model, tok = load(tiny_model_dir, dtype="fp32")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    program = PromptProgram(system="s", template="{text}", demonstrations=[Demonstration(query="q", answer="a")])
    art = Artifact.create(name="t", method="lora", base_model=str(tiny_model_dir), program=program,
                          metrics={"accuracy": 0.5})
    art.save(tmp_path / "art", model=peft_model)
    loaded = Artifact.load(tmp_path / "art")
    assert loaded.kind == "adapter" and loaded.program == program
    assert loaded.manifest.metrics == {"accuracy": 0.5}
    assert loaded.manifest.versions["torch"]
    assert (tmp_path / "art" / "adapter" / "adapter_model.safetensors").exists()
    restored, _ = loaded.load_model(dtype="fp32")
    assert type(restored).__name__ == "PeftModel"
    with pytest.raises(HoneError, match="already exists"):
        art.save(tmp_path / "art")
    art.save(tmp_path / "art", force=True)


def test_base_model_hash_mismatch_is_refused(tiny_model_dir, tmp_path):
    art = Artifact.zero_shot(str(tiny_model_dir))
    art.save(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "hone.json").read_text())
    manifest["base_model"]["hash"] = "sha256:0000"
    (tmp_path / "a" / "hone.json").write_text(json.dumps(manifest))
    with pytest.raises(HoneError, match="base model mismatch"):
        Artifact.load(tmp_path / "a")
    assert Artifact.load(tmp_path / "a", verify_base=False).name.startswith("zero-shot")


def test_resolve_takes_artifacts_and_model_names(tiny_model_dir, tmp_path):
    assert Artifact.resolve(str(tiny_model_dir)).manifest.method == "zero-shot"
    Artifact.zero_shot(str(tiny_model_dir)).save(tmp_path / "z")
    assert Artifact.resolve(tmp_path / "z").path == tmp_path / "z"
    (tmp_path / "junk").mkdir()
    with pytest.raises(HoneError, match="not an artifact"):
        Artifact.resolve(tmp_path / "junk")


def test_full_weights_are_safetensors(tiny_model_dir, tmp_path):
    from honellm.models import load

    model, tok = load(tiny_model_dir, dtype="fp32")
    art = Artifact.create(name="full", method="full", base_model=str(tiny_model_dir), program=PromptProgram())
    art.save(tmp_path / "f", model=model, tokenizer=tok)
    files = {p.name for p in (tmp_path / "f" / "model").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert Artifact.load(tmp_path / "f").kind == "full"
