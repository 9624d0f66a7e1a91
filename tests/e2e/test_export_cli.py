"""`hone export` as a user runs it: a merged folder plain transformers loads, or the adapter."""

from __future__ import annotations

import json

import gguf
import torch

from honellm.testing import make_tiny_task
from tests.e2e.helpers import hone


def test_export_merged_and_adapter(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    task = make_tiny_task(tmp_path / "task", tiny_model_dir)
    trained = hone("tune", task, "--method", "lora", "max_steps=2", "eval_every=0", "--out", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    artifact = tmp_path / "run" / "artifact"

    merged = hone("export", artifact, "--merged", tmp_path / "merged")
    assert merged.returncode == 0, merged.stderr
    assert "exported merged model" in merged.stdout
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert model.config.model_type == "llama"

    adapter = hone("export", artifact, "--format", "adapter", "--out", tmp_path / "adapter")
    assert adapter.returncode == 0, adapter.stderr
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    clash = hone("export", artifact, "--merged", tmp_path / "merged")
    assert clash.returncode == 2 and "--force" in clash.stderr and "Traceback" not in clash.stderr
    neither = hone("export", artifact)
    assert neither.returncode == 2 and "--merged FOLDER" in neither.stderr


def test_export_gguf_with_a_modelfile_and_tracked_tuning(tiny_model_dir, tmp_path):
    """`hone tune ... report_to=tensorboard`, then `hone export ART OUT --format gguf --quant f16 --quant q8_0`: the
    GGUF loads back in transformers with the merged model's logits; bad quantisations fail before any work."""
    from transformers import AutoModelForCausalLM

    task = make_tiny_task(tmp_path / "task", tiny_model_dir)
    trained = hone("tune", task, "--method", "lora", "max_steps=2", "eval_every=0", "report_to=tensorboard",
                   "--out", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    assert any((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    artifact = tmp_path / "run" / "artifact"

    exported = hone("export", artifact, tmp_path / "gguf", "--format", "gguf", "--quant", "f16", "--quant", "q8_0")
    assert exported.returncode == 0, exported.stderr
    assert "exported gguf model" in exported.stdout and "(q8_0)" in exported.stdout
    info = json.loads((tmp_path / "gguf" / "hone-export.json").read_text())
    assert info["format"] == "gguf" and set(info["files"]) == {"f16", "q8_0"}
    assert (tmp_path / "gguf" / "Modelfile").read_text().count("SYSTEM") == 1
    from honellm.artifact import Artifact

    reference, _ = Artifact.load(artifact).load_model(dtype="fp32", device="cpu")
    ids = torch.tensor([[1, 40, 41, 42, 43, 2]])
    with torch.no_grad():
        expected = reference.eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=info["files"]["f16"]["file"],
                                                   dtype=torch.float32)(ids).logits
    assert (got - expected).abs().max().item() < 5e-3

    k_quant = hone("export", artifact, tmp_path / "k", "--format", "gguf", "--quant", "q4_k_m")
    assert k_quant.returncode == 0, k_quant.stderr
    k_info = json.loads((tmp_path / "k" / "hone-export.json").read_text())
    reader = gguf.GGUFReader(tmp_path / "k" / k_info["files"]["q4_k_m"]["file"])
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    low_bits = hone("export", artifact, tmp_path / "k3", "--format", "gguf", "--quant", "q3_k_m")
    assert low_bits.returncode == 2 and "llama-quantize" in low_bits.stderr and "Traceback" not in low_bits.stderr
    assert not (tmp_path / "k3").exists()
    stray = hone("export", artifact, tmp_path / "m2", "--quant", "q8_0")
    assert stray.returncode == 2 and "--format gguf" in stray.stderr
