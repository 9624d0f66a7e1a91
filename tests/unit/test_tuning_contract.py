"""The contract every registered tuning method keeps, on the tiny model:

- a few training steps change the method's trainable parameters and nothing else (the base is untouched);
- the adapter saved the way the recipe saves it, reloaded on a fresh copy of the ORIGINAL base, gives the same
  outputs as the trained model in memory (PiSSA/OLoRA adapters are converted on save for that);
- where the method merges, the merged model gives the same outputs as base + adapter.
"""

from __future__ import annotations

import math

import pytest
import torch

from honellm.models import load
from honellm.training.batching import collate, encode_conversation
from honellm.training.logprobs import sft_loss
from honellm.training.optim import build_optimizer, build_schedule
from honellm.training.precision import Precision
from honellm.training.setup import seed_everything, setup_accelerator
from honellm.training.step import TrainStep
from honellm.tuning import all_methods, get_method
from honellm.tuning.methods import save_initial_adapter

CPU_METHODS = [name for name, m in all_methods().items() if not m.needs_gpu]
FP32 = Precision.resolve("fp32", "cpu")


def sft_batches(tokenizer, n_batches: int = 3):
    """`n_batches` micro-batches of two short labelled reviews (the two pairs alternate)."""
    pairs = [("a gripping, funny film", "positive"), ("dull and far too long", "negative"),
             ("warm and quick", "positive"), ("lifeless, lazy", "negative")]
    seqs = [encode_conversation(tokenizer, [{"role": "user", "content": f"Review: {t}"}], label, max_length=64)
            for t, label in pairs]
    return [collate(seqs[i % 2 * 2:i % 2 * 2 + 2], tokenizer.pad_token_id) for i in range(n_batches)]


def _probe(tokenizer):
    enc = tokenizer(["<|im_start|>user\nReview: a warm film<|im_end|>\n<|im_start|>assistant\n",
                     "<|im_start|>user\nthe quick brown fox<|im_end|>\n"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def logits_of(model, probe):
    model.eval()
    ids, mask = probe
    return model(input_ids=ids, attention_mask=mask).logits.float()


def test_every_method_is_registered_once_with_a_documented_config():
    assert {"lora", "rslora", "dora", "pissa", "olora", "qlora", "ia3", "prefix_tuning", "prompt_tuning", "p_tuning",
            "loha", "lokr", "full"} <= set(all_methods())
    for method in all_methods().values():
        for name, field in method.config.model_fields.items():
            assert field.description, f"{method.name}.{name} has no description"
            assert not field.is_required(), f"{method.name}.{name} has no default"


@pytest.mark.parametrize("name", CPU_METHODS)
def test_method_contract(name, tiny_model_dir, tmp_path):
    spec = get_method(name)
    config = spec.config(precision="fp32")
    seed_everything(0)
    model, tokenizer = load(tiny_model_dir, dtype="fp32", device="cpu")
    model = FP32.cast_model(spec.apply(model, config, str(tiny_model_dir)))
    check_method_contract(spec, config, model, tokenizer, tiny_model_dir, tmp_path, _probe(tokenizer))


def check_method_contract(spec, config, model, tokenizer, base_dir, tmp_path, probe, n_batches: int = 3) -> None:
    """The contract (module docstring) for `model`, the base at `base_dir` with `spec` applied (fp32): a few steps
    at a learning rate large enough to move every trainable tensor; then save, reload on the original base, compare
    `probe`'s logits. tests/unit/test_architectures.py runs it on every architecture."""
    initial = None
    if spec.initial_adapter:
        initial = tmp_path / "initial"
        save_initial_adapter(model, initial)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "no trainable parameters"

    optimizer = build_optimizer(model, lr=max(config.lr, 1e-3))
    schedule = build_schedule(optimizer, total_steps=n_batches, warmup_steps=0, schedule="constant")
    step = TrainStep(setup_accelerator(), model, optimizer, schedule, precision=FP32, max_grad_norm=1.0)
    for batch in sft_batches(tokenizer, n_batches):
        assert math.isfinite(step([batch], sft_loss).loss)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == trainable, f"frozen changed: {sorted(changed - trainable)[:3]}; trainable unchanged: " \
                                 f"{sorted(trainable - changed)[:3]}"

    # save the way the recipe does, reload on the original base: same outputs
    expected = logits_of(model, probe)
    if spec.trains_base:
        model.save_pretrained(tmp_path / "saved")
        tokenizer.save_pretrained(tmp_path / "saved")
        reloaded, _ = load(tmp_path / "saved", dtype="fp32", device="cpu")
    else:
        from peft import PeftModel

        spec.save(model, tmp_path / "adapter", initial=initial)
        base, _ = load(base_dir, dtype="fp32", device="cpu")
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(logits_of(reloaded, probe), expected, atol=1e-4, rtol=1e-4)

    # merged equals unmerged where the method merges
    if spec.merges:
        torch.testing.assert_close(logits_of(reloaded.merge_and_unload(), probe), expected, atol=1e-4, rtol=1e-4)


def test_qlora_without_a_gpu_is_a_clear_error(tiny_model_dir):
    from honellm.errors import HoneError

    spec = get_method("qlora")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(HoneError, match="needs a CUDA GPU"):
        spec.load(str(tiny_model_dir), spec.config(), torch.device("cpu"))


def test_unknown_method_and_key_suggest_the_closest(tmp_path):
    from honellm.errors import HoneError
    from honellm.methods.catalog import method_config

    with pytest.raises(HoneError, match="did you mean 'lora'"):
        get_method("lroa")
    with pytest.raises(HoneError, match="did you mean 'alpha'"):
        method_config("lora", None, ["alpah=8"])
    spec, config = method_config("dora", None, ["r=4", "lr=1e-3"])
    assert spec.name == "dora" and config.r == 4 and config.lr == 1e-3
    yaml_file = tmp_path / "tune.yaml"
    yaml_file.write_text("method: ia3\nepochs: 2\n")
    spec, config = method_config(None, yaml_file, [])
    assert spec.name == "ia3" and config.epochs == 2 and config.lr == 3e-3


def test_target_modules_by_architecture():
    from honellm.errors import HoneError
    from honellm.tuning.targets import resolve_targets

    assert resolve_targets("qwen2", "attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert resolve_targets("gpt2", "all-linear") == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    assert resolve_targets("some_new_arch", "all-linear") == "all-linear"  # PEFT's own search
    assert resolve_targets("llama", ["q_proj"]) == ["q_proj"]
    with pytest.raises(HoneError, match="no attention module list"):
        resolve_targets("some_new_arch", "attention")
    with pytest.raises(HoneError, match="unknown target_modules"):
        resolve_targets("llama", "everything")


def test_attention_kernel_choice(tiny_model_dir):
    from honellm.training.setup import pick_attention

    model, _ = load(tiny_model_dir, dtype="fp32", device="cpu")
    cpu = torch.device("cpu")
    assert pick_attention(model, "auto", device=cpu, longest=100) == "eager"
    assert pick_attention(model, "auto", device=cpu, longest=1000) == "sdpa"
    assert pick_attention(model, "eager", device=cpu, longest=1000) == "eager"
