"""Every verb on every architecture of the contract matrix (`honellm.testing.ARCHITECTURES`), on tiny random models
built here (nothing is downloaded): zero- and few-shot evaluation, each tuning method of the registry (or a clear
error where PEFT cannot apply it to the architecture), DPO and SimPO, the reward model, GRPO, serving, and merged
and adapter export (the merged model's logits equal the base + adapter applied through transformers + PEFT).

Chat templates: `chatml`, one that refuses a system turn (the system text is folded into the first user turn) and
none at all (a base model: the plain layout) go through every verb on two architectures here; the whole cross of
architectures x templates runs in tests/e2e/test_architectures_cli.py (slow).

The numbers of the fast paths against transformers (log-probs, generation, gradients) are the model core's
contract (tests/unit/test_core_exactness.py); here the checks are that each verb runs, writes what it promises,
and agrees with itself where an exact identity holds (the reference equals the policy before the first update).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from honellm.artifact import Artifact
from honellm.data.chat import fold_system, render_answer, render_prompt
from honellm.errors import HoneError
from honellm.evaluation.evaluate import evaluate
from honellm.export import export_artifact
from honellm.models import load
from honellm.program import Demonstration, PromptProgram
from honellm.reward.recipes import align_task
from honellm.reward.recipes.grpo import GRPOConfig, grpo
from honellm.runs import read_metrics
from honellm.task import Task
from honellm.testing import (
    ARCHITECTURES,
    make_tiny_arch_model,
    make_tiny_preference_task,
    make_tiny_reward_task,
    make_tiny_task,
)
from honellm.training.logprobs import sft_loss
from honellm.training.precision import Precision
from honellm.training.setup import seed_everything
from honellm.tuning import all_methods, get_method, tune_task
from tests.unit.test_tuning_contract import check_method_contract, logits_of, sft_batches

ARCHS = list(ARCHITECTURES)
CPU_METHODS = [name for name, m in all_methods().items() if not m.needs_gpu]
FP32 = Precision.resolve("fp32", "cpu")
TEMPLATES = {"chatml": "chatml", "no-system": "no-system", "none": None}
SOFT_PROMPTS = {name for name, m in all_methods().items() if not m.merges and not m.trains_base}
# Architectures whose every layer of the tiny model attends within a window of 8 tokens (gemma2 alternates with
# global layers): a soft prompt or prefix before a longer input is outside every window and gets no gradient.
ALL_WINDOWED = {"mistral", "gemma3"}

# Where PEFT cannot apply a method to an architecture, Hone refuses with a HoneError (the test then skips with the
# reason). Everything else in the method x architecture matrix must train, save and reload.
REFUSED = {
    ("gpt2", "olora"): "PEFT's OLoRA initialisation gets GPT-2's transposed Conv1D weights wrong",
    ("gpt2", "loha"): "PEFT's LoHa has no layer for GPT-2's Conv1D projections",
    ("gpt2", "lokr"): "PEFT's LoKr has no layer for GPT-2's Conv1D projections",
    ("qwen3_moe", "dora"): "the experts are fused parameters; PEFT's DoRA works on linear layers only",
    ("qwen3_moe", "pissa"): "the experts are fused parameters; PEFT's PiSSA initialisation needs linear layers",
    ("qwen3_moe", "olora"): "the experts are fused parameters; PEFT's OLoRA initialisation needs linear layers",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models(arch, template="chatml", wide=False) -> the folder of a tiny random model, built once per module
    (`wide`: a sliding window of 64 tokens instead of 8)."""
    built: dict[tuple[str, str, bool], object] = {}
    root = tmp_path_factory.mktemp("arch-models")

    def get(arch: str, template: str = "chatml", wide: bool = False):
        if (arch, template, wide) not in built:
            built[arch, template, wide] = make_tiny_arch_model(
                root / f"{arch}-{template}{'-wide' if wide else ''}", arch, chat_template=TEMPLATES[template],
                overrides={"sliding_window": 64} if wide else None)
        return built[arch, template, wide]

    return get


def _probe(tokenizer):
    """Two rows of different lengths (padding matters), laid out by the model's own chat template or plain layout."""
    messages = [{"role": "system", "content": "Classify the review."}, {"role": "user", "content": "Review: a warm film"}]
    texts = [render_prompt(tokenizer, messages), "the quick brown fox jumps over the lazy dog"]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


# ------------------------------------------------------------------------------------------------ chat templates


def test_a_template_without_system_turns_gets_the_system_folded_into_the_first_user_turn(models):
    _, tok = load(models("llama", "no-system"), dtype="fp32", device="cpu")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template(messages, tokenize=False)  # the template itself refuses
    prompt = render_prompt(tok, messages)
    assert prompt == "<|im_start|>user\nBe brief.\n\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_answer(tok, messages, "ok") == "ok<|im_end|>"
    # a few-shot conversation: only the first user turn carries the system text
    few = [*messages, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    assert fold_system(few)[0]["content"] == "Be brief.\n\nhi" and fold_system(few)[2] == {"role": "user",
                                                                                           "content": "b"}
    # a system message alone becomes a user turn; a conversation without one is untouched
    assert fold_system([{"role": "system", "content": "s"}]) == [{"role": "user", "content": "s"}]
    assert fold_system(few[1:]) == few[1:]


def test_a_template_that_takes_system_turns_keeps_them(models):
    _, tok = load(models("llama"), dtype="fp32", device="cpu")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert render_prompt(tok, messages).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")


def test_a_base_model_gets_the_plain_layout(models):
    _, tok = load(models("llama", "none"), dtype="fp32", device="cpu")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert not tok.chat_template
    assert render_prompt(tok, messages) == "Be brief.\n\nUser: hi\nAssistant:"
    assert render_answer(tok, messages, "ok") == f" ok{tok.eos_token}"


def test_a_template_that_refuses_a_conversation_is_a_clear_error(models, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models("llama"))
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(HoneError, match="chat template refused the conversation .*must alternate") as info:
        render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert info.value.fix


# ------------------------------------------------------------------------------------------------ evaluation


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_and_few_shot_evaluation(models, arch, tmp_path):
    model_dir = models(arch)
    task = Task.load(make_tiny_task(tmp_path / "task", model_dir, n_train=8, n_validation=6))
    zero = evaluate(str(model_dir), task, "validation", progress=False)
    program = PromptProgram(system="Classify the review.", template="Review: {text}",
                            demonstrations=[Demonstration(query="Review: a warm film", answer="positive"),
                                            Demonstration(query="Review: a dull film", answer="negative")])
    few = evaluate(Artifact.create(name="few", method="prompt", base_model=str(model_dir), program=program, task=task),
                   task, "validation", progress=False)
    for result in (zero, few):
        assert result.n == 6 and result.mode == "choices" and 0 <= result.score <= 1
        for record in result.records:
            logprobs = record.details["choice_logprobs"]
            assert set(logprobs) == {"positive", "negative"} and all(math.isfinite(v) and v < 0 for v in logprobs.values())
    assert all("a dull film" in r.prompt for r in few.records) and not any("a dull film" in r.prompt for r in zero.records)
    # the demonstrations change the scores: the model does read them
    assert [r.details["choice_logprobs"] for r in zero.records] != [r.details["choice_logprobs"] for r in few.records]


# ------------------------------------------------------------------------------------------------ tuning methods


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_tuning_method(models, arch, method, tmp_path):
    """A few steps change the method's trainable parameters and nothing else; the saved adapter (or model), reloaded
    on the original base, gives the same logits; where the method merges, so does the merged model.

    Soft prompts and prefixes train on a wider sliding window where every layer is windowed: see
    test_a_soft_prompt_outside_every_window_gets_no_gradient."""
    model_dir = models(arch, wide=method in SOFT_PROMPTS and arch in ALL_WINDOWED)
    spec = get_method(method)
    config = spec.config(precision="fp32")
    seed_everything(0)
    model, tokenizer = load(model_dir, dtype="fp32", device="cpu")
    if (arch, method) in REFUSED:
        with pytest.raises(HoneError) as info:
            spec.apply(model, config, str(model_dir))
        assert info.value.fix and "Traceback" not in str(info.value)
        pytest.skip(f"{method} on {arch}: {REFUSED[arch, method]} (Hone says: {info.value})")
    model = FP32.cast_model(spec.apply(model, config, str(model_dir)))
    check_method_contract(spec, config, model, tokenizer, model_dir, tmp_path, _probe(tokenizer), n_batches=2)


def test_a_soft_prompt_outside_every_window_gets_no_gradient(models):
    """Why the windowed models train soft prompts on a wider window above: with a window of 8 tokens on every
    layer, an answer 20+ tokens after the soft prompt cannot attend to it (transformers' own attention), so the
    prompt's gradient is exactly zero. Real windows (4,096 tokens for Mistral 7B v0.1) are far longer."""
    spec = get_method("prompt_tuning")
    model, tokenizer = load(models("mistral"), dtype="fp32", device="cpu")
    model = FP32.cast_model(spec.apply(model, spec.config(precision="fp32"), str(models("mistral"))))
    model.train()
    loss = sft_loss(model, sft_batches(tokenizer, 1)[0]).total
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("method", ["dora", "pissa", "olora"])
def test_lora_variants_on_a_moe_model_adapt_the_attention_when_asked(models, method):
    """The way out the refusal names: the variant on the attention projections of the MoE model."""
    model_dir = models("qwen3_moe")
    spec = get_method(method)
    model, _ = load(model_dir, dtype="fp32", device="cpu")
    with pytest.raises(HoneError, match="target_modules=attention"):
        spec.apply(model, spec.config(), str(model_dir))
    model, _ = load(model_dir, dtype="fp32", device="cpu")
    peft_model = spec.apply(model, spec.config(target_modules="attention"), str(model_dir))
    assert set(peft_model.peft_config["default"].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_moe_targets():
    from honellm.tuning.targets import ia3_targets, resolve_targets

    assert resolve_targets("qwen3_moe", "all-linear") == "all-linear"  # PEFT: attention modules + expert parameters
    assert resolve_targets("mixtral", "attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(HoneError, match="fused parameters"):
        resolve_targets("qwen3_moe", "mlp")
    assert ia3_targets("qwen3_moe") == (["k_proj", "v_proj"], [])
    assert ia3_targets("llama") == (None, None)  # PEFT's own choice


def test_ia3_has_targets_on_every_architecture(models):
    """PEFT knows IA3's modules for some architectures only; Hone's table covers the rest of the matrix."""
    spec = get_method("ia3")
    for arch in ARCHS:
        model, _ = load(models(arch), dtype="fp32", device="cpu")
        peft_model = spec.apply(model, spec.config(), str(models(arch)))
        assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0, arch


# ------------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_tune_then_merged_and_adapter_export(models, arch, tmp_path):
    """The recipe trains; the merged export loads in plain transformers with the logits of base + adapter applied
    through transformers + PEFT (fp32, 1e-4); the adapter export loads with PEFT on the base it names."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = models(arch)
    task_yaml = make_tiny_task(tmp_path / "task", model_dir, n_train=8, n_validation=4)
    art = tune_task(str(task_yaml), "lora", ["max_steps=2", "eval_every=0", "lr=2e-2", "batch_size=4", "r=4"],
                    out=str(tmp_path / "run"))
    assert art.kind == "adapter" and [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
                                      if "loss" in r] == [1, 2]
    merged_dir = export_artifact(art.path, tmp_path / "merged")
    adapter_dir = export_artifact(art.path, tmp_path / "adapter", format="adapter")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    probe = _probe(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    unadapted = logits_of(base, probe)
    reference = PeftModel.from_pretrained(base, art.path / "adapter")
    expected = logits_of(reference, probe)
    assert not torch.allclose(unadapted, expected, atol=1e-3), "the adapter does not change the outputs"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert merged.config.model_type == base.config.model_type
    torch.testing.assert_close(logits_of(merged, probe), expected, atol=1e-4, rtol=1e-4)

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(model_dir.resolve())
    fresh = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    torch.testing.assert_close(logits_of(PeftModel.from_pretrained(fresh, adapter_dir), probe), expected,
                               atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ preferences, RL


PREF = ["max_steps=2", "batch_size=4", "eval_every=2", "r=4", "lr=1e-2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_dpo_and_simpo(models, arch, tmp_path):
    """DPO's first loss is ln 2 exactly (the reference, the adapter disabled, equals the policy before the first
    update); SimPO (no reference) trains too; both evaluate by implicit reward."""
    task_yaml = make_tiny_preference_task(tmp_path / "prefs", models(arch), n_train=8, n_validation=4)
    for method in ("dpo", "simpo"):
        out = tmp_path / method
        art = align_task(str(task_yaml), method, [*PREF, "precision=fp32"], out=str(out))
        rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
        assert art.kind == "adapter" and 0 <= art.manifest.metrics["val_accuracy"] <= 1
        if method == "dpo":
            assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
            assert rows[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_reward_model(models, arch, tmp_path):
    from honellm.reward.reward_model import load_reward_model

    task_yaml = make_tiny_preference_task(tmp_path / "prefs", models(arch), n_train=8, n_validation=4)
    out = tmp_path / "rm"
    art = align_task(str(task_yaml), "reward_model", PREF, out=str(out))
    assert art.kind == "reward_model" and art.manifest.metrics["score_std"] >= 0
    rm = load_reward_model(out / "artifact", dtype="fp32", device="cpu")
    scores = rm.score([[{"role": "user", "content": "Review: a warm film"}]] * 2, ["positive", "negative"])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
    result = evaluate(out / "artifact", Task.load(task_yaml), "validation", progress=False, model=rm.model,
                      tokenizer=rm.tokenizer)
    assert result.extras["preference_scorer"] == "reward_model_margins" and result.n == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_grpo(models, arch, tmp_path):
    """Two GRPO steps; the KL to the reference is exactly 0 before the first update."""
    task = Task.load(make_tiny_reward_task(tmp_path / "task", models(arch), n_train=8, n_validation=4,
                                           max_new_tokens=4))
    config = GRPOConfig(max_steps=2, prompts_per_step=2, group_size=2, batch_size=4, guard_prompts=2, r=4,
                        max_new_tokens=4, precision="fp32", eval_every=1, lr=1e-3,
                        dynamic_sampling=False)  # a random model's groups often tie: update on every step
    art = grpo(task, config, out=tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"]
    guard = [r for r in rows if r.get("kind") == "guard"]
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    assert train[0]["kl"] == 0.0 and guard[0]["kl"] == 0.0
    assert art.kind == "adapter" and (tmp_path / "run" / "artifact" / "adapter").is_dir()


# ------------------------------------------------------------------------------------------------ serving


def _serve_and_chat(paths: list[str], messages: list[dict]) -> list[dict]:
    from fastapi.testclient import TestClient

    from honellm.serve.app import create_app
    from honellm.serve.config import ServeConfig
    from honellm.serve.registry import load_models

    served = load_models(paths, dtype="fp32", device="cpu")
    answers = []
    with TestClient(create_app(served, ServeConfig())) as client:
        for model in served:
            response = client.post("/v1/chat/completions", json={"model": model.name, "messages": messages,
                                                                  "max_tokens": 4, "temperature": 0})
            assert response.status_code == 200, response.text
            answers.append(response.json())
    return answers


HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Review: a warm film"}]


@pytest.mark.parametrize("arch", ARCHS)
def test_serving_a_chat_completion(models, arch, tmp_path):
    """The base model and an adapter on it, through the OpenAI app: a greedy chat completion each."""
    model_dir = models(arch)
    task_yaml = make_tiny_task(tmp_path / "task", model_dir, n_train=4, n_validation=2)
    adapter = tune_task(str(task_yaml), "lora", ["max_steps=1", "eval_every=0", "batch_size=4", "r=4", "lr=2e-2"],
                        out=str(tmp_path / "run")).path
    for answer in _serve_and_chat([str(adapter), str(model_dir)], HELLO):
        choice = answer["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        assert answer["usage"]["prompt_tokens"] > 0 and 0 < answer["usage"]["completion_tokens"] <= 4


# ------------------------------------------------------------------------------------------------ chat templates x verbs


def run_every_verb(model_dir, template: str, tmp_path) -> None:
    """Evaluation, LoRA tuning, merged export, DPO, the reward model, GRPO and serving on `model_dir`, whose chat
    template is `template`; the prompts use the layout that template calls for (shared with the e2e cross)."""
    task_yaml = make_tiny_task(tmp_path / "task", model_dir, n_train=8, n_validation=4)
    task = Task.load(task_yaml)
    zero = evaluate(str(model_dir), task, "validation", progress=False)
    if template == "no-system":
        assert all(r.prompt.startswith("<|im_start|>user\nClassify the review.\n\nReview: ") for r in zero.records)
    elif template == "none":
        assert all(r.prompt.startswith("Classify the review.\n\nUser: Review: ") and r.prompt.endswith("Assistant:")
                   for r in zero.records)
    else:
        assert all(r.prompt.startswith("<|im_start|>system\nClassify the review.<|im_end|>") for r in zero.records)
    art = tune_task(str(task_yaml), "lora", ["max_steps=2", "eval_every=2", "batch_size=4", "r=4"],
                    out=str(tmp_path / "tune"))
    assert 0 <= art.manifest.metrics["val_accuracy"] <= 1
    export_artifact(art.path, tmp_path / "merged")
    prefs = make_tiny_preference_task(tmp_path / "prefs", model_dir, n_train=8, n_validation=4)
    dpo = align_task(str(prefs), "dpo", [*PREF, "precision=fp32"], out=str(tmp_path / "dpo"))
    assert [r["loss"] for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if "loss" in r][0] == \
        pytest.approx(math.log(2), abs=1e-5)
    assert dpo.kind == "adapter"
    assert align_task(str(prefs), "reward_model", PREF, out=str(tmp_path / "rm")).kind == "reward_model"
    rl_task = Task.load(make_tiny_reward_task(tmp_path / "rl", model_dir, n_train=4, n_validation=2, max_new_tokens=4))
    grpo(rl_task, GRPOConfig(max_steps=1, prompts_per_step=2, group_size=2, batch_size=4, guard_prompts=2, r=4,
                             max_new_tokens=4, precision="fp32"), out=tmp_path / "grpo")
    answer = _serve_and_chat([str(art.path)], HELLO)[0]
    assert answer["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize("template", ["no-system", "none"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_every_verb_without_system_turns_or_without_a_chat_template(models, arch, template, tmp_path):
    """A model whose template refuses a system turn and a base model without a template: evaluation, tuning,
    DPO, the reward model, GRPO, serving and export all run, and no prompt renders a system turn."""
    run_every_verb(models(arch, template), template, tmp_path)
