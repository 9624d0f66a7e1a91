"""`hone export` as a user runs it: a merged folder plain transformers loads, or the adapter."""

from __future__ import annotations

import json

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
