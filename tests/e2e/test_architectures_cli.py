"""The architecture matrix, the heavier half (slow): every verb through the real `hone` CLI on each architecture,
and every verb (library calls) on each architecture x chat template (one that refuses a system turn, none at all).

The fast half, every method on every architecture with the ChatML template, is tests/unit/test_architectures.py.
"""

from __future__ import annotations

import json
import os

import pytest

from honellm.testing import ARCHITECTURES, make_tiny_arch_model, make_tiny_preference_task, make_tiny_task
from tests.e2e.helpers import hone
from tests.unit.test_architectures import TEMPLATES, run_every_verb

# CI runs a spread of the matrix through the CLI (LLaMA-family, windowed + soft-capped, Conv1D, MoE) to stay within
# its time budget: tests/unit/test_architectures.py already runs every verb on all thirteen through the library.
# HONE_FULL_MATRIX=1 runs all thirteen here too (about 10 minutes on a free 2-core machine).
FULL = os.environ.get("HONE_FULL_MATRIX") == "1"
ARCHS = list(ARCHITECTURES)
CLI_ARCHS = ARCHS if FULL else ["llama", "gemma2", "gpt2", "qwen3_moe"]
CROSS_ARCHS = ARCHS if FULL else ["mistral", "phi3", "gpt_neox", "opt"]
FP32 = {"HONE_CPU_BF16": "0"}  # tiny models run faster in fp32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.mark.parametrize("arch", CLI_ARCHS)
def test_every_verb_through_the_cli(arch, tmp_path):
    """prompt (few-shot, evaluated), tune, align and export as a user runs them; the chat template rotates over the
    architectures (ChatML, one that refuses a system turn, none), so each layout meets several architectures."""
    template = list(TEMPLATES)[ARCHS.index(arch) % 3]
    model = make_tiny_arch_model(tmp_path / "model", arch, chat_template=TEMPLATES[template])
    task = make_tiny_task(tmp_path / "task", model, n_train=8, n_validation=4)
    prefs = make_tiny_preference_task(tmp_path / "prefs", model, n_train=8, n_validation=4)
    env = FP32 | {"HONE_RUNS": str(tmp_path / "runs")}

    few = hone("prompt", task, "--shots", "2", "--max-examples", "4", "--out", tmp_path / "few", env=env)
    assert few.returncode == 0, few.stderr  # builds the few-shot program and evaluates it on the validation split
    assert "validation accuracy" in few.stdout and (tmp_path / "few" / "prompt.json").exists()
    tuned = hone("tune", task, "--method", "lora", "max_steps=2", "eval_every=0", "r=4", "--out", tmp_path / "tune",
                 env=env)
    assert tuned.returncode == 0, tuned.stderr
    aligned = hone("align", prefs, "--method", "dpo", "max_steps=2", "batch_size=4", "eval_every=0", "r=4",
                   "--out", tmp_path / "dpo", env=env)
    assert aligned.returncode == 0, aligned.stderr
    merged = hone("export", tmp_path / "tune" / "artifact", "--merged", tmp_path / "merged", env=env)
    assert merged.returncode == 0, merged.stderr
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == json.loads((model / "config.json").read_text())["model_type"]


@pytest.mark.parametrize("template", ["no-system", "none"])
@pytest.mark.parametrize("arch", CROSS_ARCHS)
def test_every_verb_on_every_chat_template(arch, template, tmp_path):
    """The whole cross of architectures x chat templates (the unit tests run two architectures of it)."""
    model = make_tiny_arch_model(tmp_path / "model", arch, chat_template=TEMPLATES[template])
    run_every_verb(model, template, tmp_path)


def test_a_method_peft_cannot_apply_is_a_clear_error_not_a_traceback(tmp_path):
    model = make_tiny_arch_model(tmp_path / "model", "gpt2")
    task = make_tiny_task(tmp_path / "task", model, n_train=8, n_validation=4)
    refused = hone("tune", task, "--method", "loha", "max_steps=1", "--out", tmp_path / "run", env=FP32)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "Conv1D" in refused.stderr and "--method lora" in refused.stderr
    assert not (tmp_path / "run" / "artifact").exists()
