"""The one eligibility check (honellm/core/support.py): what it says for each kind of model, that every caller
follows it, that HONE_FAST=0 turns everything off, and that users see it (`hone models --check`, run logs)."""

from __future__ import annotations

import json
import sys

import pytest
import transformers
from typer.testing import CliRunner

from honellm import hardware
from honellm.core import fastpath, fused, support
from honellm.core.runners import DecoderRunner, HFRunner, attention_windows, make_runner
from honellm.core.support import fast_path_support


def llama(**extra):
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128, **extra)


@pytest.mark.parametrize("config, training, decoding, reason", [
    (llama(), True, True, None),
    (llama(attention_bias=True, mlp_bias=True), True, True, None),  # biases are computed by the modules' own weights
    (llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 256}), True, True, None),
    (llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), False, False, "rope type 'dynamic'"),
    (llama(pretraining_tp=2), False, False, "pretraining_tp"),
    (transformers.MistralConfig(sliding_window=8), False, False, "sliding-window"),
    (transformers.MistralConfig(sliding_window=None), True, True, None),
    (transformers.MistralConfig(sliding_window=4096, max_position_embeddings=4096), True, True, None),  # never binds
    (transformers.Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=1, num_hidden_layers=2),
     False, False, "sliding-window"),
    (transformers.Qwen3Config(), False, True, "q/k norms"),
    (transformers.Gemma2Config(), False, False, "'gemma2'"),
    (transformers.GraniteConfig(), False, False, "'granite'"),
    (transformers.Qwen3MoeConfig(), False, False, "'qwen3_moe'"),
    (transformers.GPT2Config(), False, False, "'gpt2'"),
])
def test_the_check_by_config(config, training, decoding, reason):
    found = fast_path_support(config, kernels=False)
    assert (found.training, found.decoding) == (training, decoding), found.reasons
    if reason is not None:
        assert reason in (found.reasons.get("training", "") + found.reasons.get("decoding", ""))
    for path in ("training", "decoding"):
        assert getattr(found, path) or found.reasons[path]


def test_a_llama_config_with_unimplemented_fields_steps_aside():
    config = llama()
    config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in fast_path_support(config, kernels=False).reasons["decoding"]


def test_callers_follow_the_check(tiny_model_dir, monkeypatch):
    """The decoding runner, the training forward and fused LoRA take the check's answer; HONE_FAST=0 turns all off
    (the kernels too: tests/unit/test_core_csrc.py)."""
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert isinstance(make_runner(model), DecoderRunner) and fastpath.decoder_of(model) is not None
    monkeypatch.setenv("HONE_FAST", "0")
    found = fast_path_support(model)
    assert not (found.training or found.decoding or found.kernels)
    assert set(found.reasons.values()) == {"HONE_FAST=0"}
    assert isinstance(make_runner(model), HFRunner) and fastpath.decoder_of(model) is None
    assert fused.install(model) == 0
    monkeypatch.delenv("HONE_FAST")
    assert fused.install(model) == 4  # q and v in each of the 2 layers
    fused.uninstall(model)


def test_note_paths_writes_one_event(tiny_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    events, lines = [], []

    class Run:
        def log_metrics(self, **values):
            events.append(values)

    found = support.note_paths(model, Run(), lines.append)
    assert len(events) == 1 and events[0]["event"] == "model_paths" and events[0]["decoding"] is True
    assert events[0]["reasons"]["kernels"]  # what runs, or why torch's operations do (a kernel's fallback)
    assert lines == [f"model paths: {found.summary()}"]


def test_attention_windows_by_layer_type():
    assert attention_windows(llama()) is None
    assert attention_windows(transformers.MistralConfig(sliding_window=8)) == {"": 8}
    gemma = transformers.Gemma2Config(sliding_window=8, num_hidden_layers=2)
    assert attention_windows(gemma) == {"full_attention": None, "sliding_attention": 8}


def test_hone_models_check(tiny_model_dir, tmp_path):
    from honellm.cli.app import app
    from honellm.testing import make_tiny_arch_model

    runner = CliRunner()
    result = runner.invoke(app, ["models", "--check", str(tiny_model_dir), "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found["model_type"] == "llama" and found["training"] and found["decoding"]
    gemma = make_tiny_arch_model(tmp_path / "gemma2", "gemma2")
    result = runner.invoke(app, ["models", "--check", str(gemma)])
    assert result.exit_code == 0, result.output
    assert "transformers" in result.output and "gemma2" in result.output


@pytest.fixture
def fresh_kernels():
    """The native kernels resolved anew in the test (and again after it, so that later tests see the real ones)."""
    from honellm.core import native

    native._reset()
    yield native
    native._reset()


@pytest.mark.parametrize("cause", ["HONE_NATIVE=0", "self-check"])
def test_a_run_whose_kernels_fall_back_to_torch_says_so(tiny_model_dir, tmp_path, monkeypatch, capsys, fresh_kernels,
                                                        cause):
    """The native kernels step aside silently at run time (torch's operations compute the same thing), so the run
    log is where it shows: the `model_paths` line beside the start line of metrics.jsonl, and the note the user
    sees, say that torch's operations run and why."""
    from honellm.runs import read_metrics
    from honellm.testing import make_tiny_task
    from honellm.tuning import tune_task

    native = fresh_kernels
    if cause == "HONE_NATIVE=0":
        monkeypatch.setenv("HONE_NATIVE", "0")
        reason = "(HONE_NATIVE=0)"
    else:  # kernels that build and load here, then disagree with torch: as a miscompiled kernel would
        if sys.platform != "linux" or not all(f in hardware.cpu_flags() for f in ("avx512f", "avx512bw", "avx512_bf16")):
            pytest.skip("the native kernels do not build on this machine: nothing to check itself")
        monkeypatch.setattr(native, "_self_check", lambda kernels: "rms_norm differs by 0.5")
        reason = "(a native kernel disagreed with torch: rms_norm differs by 0.5)"
    monkeypatch.delenv("HONE_QUIET", raising=False)
    task_yaml = make_tiny_task(tmp_path / "task", tiny_model_dir, n_train=4, n_validation=2)
    tune_task(str(task_yaml), "lora", ["max_steps=1", "eval_every=0", "batch_size=4", "r=4", "precision=bf16"],
              out=str(tmp_path / "run"))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r.get("event") for r in rows[:2]] == ["start", "model_paths"]
    paths = rows[1]
    assert paths["training"] is True and paths["kernels"] is False  # the fast forward runs, on torch's operations
    assert reason in paths["reasons"]["kernels"] and paths["reasons"]["kernels"].startswith("torch.mv and oneDNN")
    err = capsys.readouterr().err
    assert "hone: model paths:" in err and f"kernels torch (torch.mv and oneDNN {reason}" in err
