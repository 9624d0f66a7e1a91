"""Offline preference recipes on the tiny model: the registry, the reference (adapter disabled = the base model,
computed once), the one-forward pair batch, the recipe losses against the pure losses, evaluation and resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from honellm.errors import HoneError
from honellm.evaluation.evaluate import evaluate
from honellm.hardware import pick_dtype
from honellm.methods import catalog
from honellm.models import load
from honellm.program import PromptProgram
from honellm.reward.losses import PreferenceLogps, get_preference_loss
from honellm.reward.recipes import align_task
from honellm.reward.recipes.common import (
    AlignConfig,
    collate_pairs,
    encode_pairs,
    pair_logps,
    reference_scores,
    score_pairs,
)
from honellm.reward.recipes.preference import (
    KTOConfig,
    UnpairedBatch,
    kl_partners,
    kto_loss_fn,
    preference_loss_fn,
)
from honellm.runs import read_metrics
from honellm.task import Task
from honellm.testing import make_tiny_preference_task, make_tiny_task
from honellm.training.batching import collate
from honellm.training.logprobs import sequence_logprobs
from honellm.training.precision import Precision
from honellm.training.setup import seed_everything, setup_accelerator
from honellm.tuning import get_method

FP32 = Precision(torch.float32, "cpu")
PAIRED = ["dpo", "ipo", "cdpo", "orpo", "simpo"]
QUICK = ["max_steps=2", "batch_size=4", "eval_batch_size=32", "r=4"]


@pytest.fixture(scope="module")
def task_yaml(tiny_model_dir, tmp_path_factory):
    return make_tiny_preference_task(tmp_path_factory.mktemp("prefs"), tiny_model_dir)


@pytest.fixture(scope="module")
def task(task_yaml):
    return Task.load(task_yaml)


def _lora_model(tiny_model_dir, *, moved: bool = True):
    """The tiny model with a LoRA adapter whose B is non-zero (so the adapter changes the outputs)."""
    seed_everything(0)
    model, tokenizer = load(tiny_model_dir, dtype="fp32", device="cpu")
    model = get_method("lora").apply(model, AlignConfig(r=4), str(tiny_model_dir))
    if moved:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.2)
    return model.train(), tokenizer


def _pairs(task, tokenizer, n=6):
    return encode_pairs(task, PromptProgram.from_task(task), tokenizer, "train", max_length=64, limit=n)


# ------------------------------------------------------------------------------------------------ registry


def test_every_method_is_registered_once_with_a_documented_config():
    methods = catalog.all_methods("reward")
    assert {"reward_model", "dpo", "ipo", "cdpo", "kto", "orpo", "simpo"} <= set(methods)
    for method in methods.values():
        assert method.summary and method.data
        for name, field in method.config.model_fields.items():
            assert field.description, f"{method.name}.{name} has no description"
            assert not field.is_required(), f"{method.name}.{name} has no default"


def test_unknown_names_suggest_the_closest(task_yaml):
    with pytest.raises(HoneError, match="did you mean 'dpo'"):
        catalog.get_method("dpoo", "reward")  # not "dpp": "ppo" is as close to it as "dpo"
    with pytest.raises(HoneError, match="did you mean 'beta'"):
        align_task(str(task_yaml), "dpo", ["betta=0.2"])


def test_a_task_without_pairs_is_refused_before_loading_a_model(tiny_model_dir, tmp_path):
    sft_task = make_tiny_task(tmp_path / "sft", tiny_model_dir)
    with pytest.raises(HoneError) as info:
        align_task(str(sft_task), "dpo", QUICK, out=str(tmp_path / "run"))
    assert "dpo trains on preference data" in info.value.what and "chosen" in info.value.fix
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ the pieces


def test_reference_is_the_base_model_with_the_adapter_disabled(tiny_model_dir, task):
    model, tokenizer = _lora_model(tiny_model_dir)
    pairs = _pairs(task, tokenizer)
    sequences = [s for p in pairs for s in (p.chosen, p.rejected)]
    kwargs = {"pad_id": tokenizer.pad_token_id, "precision": FP32, "batch_size": 4, "accelerator": setup_accelerator()}
    reference = reference_scores(model, sequences, **kwargs)
    base, _ = load(tiny_model_dir, dtype="fp32", device="cpu")
    expected, _ = sequence_logprobs(base, collate(sequences, tokenizer.pad_token_id))
    torch.testing.assert_close(reference, expected.float(), rtol=1e-5, atol=1e-5)
    policy = score_pairs(model, pairs, **kwargs)  # the adapter is back on afterwards: different values
    assert not torch.allclose(policy.chosen, reference[0::2], atol=1e-3)
    assert model.training  # the mode is restored


def test_chosen_and_rejected_in_one_forward_equal_two_forwards(tiny_model_dir, task):
    model, tokenizer = _lora_model(tiny_model_dir)
    pairs = _pairs(task, tokenizer)
    calls = []
    hook = model.get_base_model().model.register_forward_hook(lambda *_: calls.append(1))
    try:
        joint = pair_logps(model, collate_pairs(pairs, list(range(len(pairs))), tokenizer.pad_token_id))
    finally:
        hook.remove()
    assert len(calls) == 1
    chosen, chosen_n = sequence_logprobs(model, collate([p.chosen for p in pairs], tokenizer.pad_token_id))
    rejected, rejected_n = sequence_logprobs(model, collate([p.rejected for p in pairs], tokenizer.pad_token_id))
    torch.testing.assert_close(joint.chosen, chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(joint.rejected, rejected, rtol=1e-5, atol=1e-5)
    assert joint.chosen_lengths.tolist() == chosen_n.tolist() and joint.rejected_lengths.tolist() == rejected_n.tolist()


@pytest.mark.parametrize("method", PAIRED)
def test_recipe_loss_equals_the_pure_loss(tiny_model_dir, task, method):
    model, tokenizer = _lora_model(tiny_model_dir)
    pairs = _pairs(task, tokenizer)
    config = catalog.get_method(method, "reward").config()
    ref = {"chosen": -torch.rand(len(pairs)) * 20, "rejected": -torch.rand(len(pairs)) * 20}
    batch = collate_pairs(pairs, list(range(len(pairs))), tokenizer.pad_token_id, ref)
    out = preference_loss_fn(method, config.loss_hparams())(model, batch)
    assert out.count == len(pairs)

    chosen, chosen_n = sequence_logprobs(model, collate([p.chosen for p in pairs], tokenizer.pad_token_id))
    rejected, rejected_n = sequence_logprobs(model, collate([p.rejected for p in pairs], tokenizer.pad_token_id))
    expected, metrics = get_preference_loss(method)(
        PreferenceLogps(chosen, rejected, chosen_n, rejected_n, ref["chosen"], ref["rejected"]),
        **config.loss_hparams())
    torch.testing.assert_close(out.total / out.count, expected, rtol=1e-5, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        # 0-d tensors, left for the step's one read of the device (a float() here is a wait per metric on a GPU)
        assert isinstance(out.metrics[key], torch.Tensor) and out.metrics[key].dim() == 0
        assert not out.metrics[key].requires_grad
        assert float(out.metrics[key]) / out.count == pytest.approx(float(metrics[key]), rel=1e-4, abs=1e-6)
    out.total.backward()  # the gradient reaches the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_kto_recipe_loss_equals_the_pure_loss(tiny_model_dir, task):
    model, tokenizer = _lora_model(tiny_model_dir)
    pairs = _pairs(task, tokenizer, n=4)
    sequences = [p.chosen for p in pairs[:3]] + [p.rejected for p in pairs]  # 3 desirable, 4 undesirable
    desirable = torch.tensor([True] * 3 + [False] * 4)
    ref = -torch.rand(len(sequences)) * 20
    kl_policy, kl_ref = torch.tensor([-12.0]), torch.tensor([-12.5])  # z = 0.5
    hparams = KTOConfig(beta=0.5).loss_hparams()
    batch = UnpairedBatch(collate(sequences, tokenizer.pad_token_id), torch.arange(len(sequences)), desirable, ref,
                          kl_policy, kl_ref)
    out = kto_loss_fn(hparams)(model, batch)
    logps, lengths = sequence_logprobs(model, collate(sequences, tokenizer.pad_token_id))
    expected, metrics = get_preference_loss("kto")(
        PreferenceLogps(logps[:3], logps[3:], lengths[:3], lengths[3:], ref[:3], ref[3:], kl=kl_policy, ref_kl=kl_ref),
        **hparams)
    torch.testing.assert_close(out.total / out.count, expected, rtol=1e-5, atol=1e-6)
    assert float(metrics["kl"]) == pytest.approx(0.5)
    assert out.metrics["rewards/chosen"] / 3 == pytest.approx(float(metrics["rewards/chosen"]), rel=1e-4)


def test_kto_mismatched_pairs_never_share_a_prompt(task):
    examples = task.unpaired("train")
    partner = kl_partners(examples, seed=0)
    assert all(examples[i].prompt != examples[j].prompt for i, j in enumerate(partner))
    assert kl_partners(examples, seed=0) == partner  # fixed for the run: its reference log-probs can be cached


# ------------------------------------------------------------------------------------------------ the recipes


@pytest.mark.parametrize("method", [*PAIRED, "kto"])
def test_each_method_trains_logs_and_saves_an_adapter(task_yaml, tmp_path, method):
    out = tmp_path / "run"
    art = align_task(str(task_yaml), method, [*QUICK, "eval_every=1", "lr=1e-2"], out=str(out))
    assert art.kind == "adapter" and art.manifest.method == method and (out / "artifact" / "adapter").is_dir()
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "tokens_per_second"):
        assert all(key in r for r in steps), key
    evals = [r for r in rows if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [1, 2] and all(0 <= r["val_accuracy"] <= 1 for r in evals)
    assert art.manifest.metrics["val_accuracy"] == max(r["val_accuracy"] for r in evals)
    assert (out / "reference_logps.pt").exists() == (method not in ("orpo", "simpo"))
    # the reference pass is work the method does besides its steps: in the cost, and in what a comparison charges
    from honellm.evaluation.cost import making_seconds

    cost = art.manifest.cost
    assert (cost["reference_seconds"] > 0) == (method not in ("orpo", "simpo"))
    assert making_seconds(cost) == pytest.approx(cost["train_seconds"] + cost["reference_seconds"])


@pytest.mark.parametrize("method", ["dpo", "kto", "simpo"])
def test_training_moves_the_policy_towards_the_chosen_answers(tiny_model_dir, tmp_path, method):
    """The chosen answer is always "yes" and the rejected "no": a few steps must rank every held-out pair right
    (the signs of log-ratios, rewards and the loss are the right way round)."""
    import json

    folder = tmp_path / "task"
    folder.mkdir()
    for split, n in (("train", 16), ("validation", 8)):
        rows = [{"prompt": f"Question {i}: is it a warm film?", "chosen": "yes", "rejected": "no"} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "task.yaml").write_text(f"name: yes-no\nmodel: {tiny_model_dir}\n"
                                      "data: {train: train.jsonl, validation: validation.jsonl}\n")
    art = align_task(str(folder / "task.yaml"), method, ["max_steps=6", "batch_size=4", "eval_every=6", "lr=3e-2",
                                                          "r=4", "warmup_ratio=0"], out=str(tmp_path / "run"))
    assert art.manifest.metrics["val_accuracy"] == 1.0


def test_eval_of_a_dpo_artifact_reports_implicit_reward_accuracy(task_yaml, task, tmp_path, monkeypatch):
    from honellm.core.runners import DecoderRunner, HFRunner

    art = align_task(str(task_yaml), "dpo", [*QUICK, "eval_every=0", "lr=1e-2", "beta=0.3"], out=str(tmp_path / "run"))
    runs = {"decoder": [], "transformers": []}  # which runner scored, and in which dtype
    for name, runner in (("decoder", DecoderRunner), ("transformers", HFRunner)):
        original = runner.forward
        monkeypatch.setattr(runner, "forward", lambda self, *a, _f=original, _n=name, **k: runs[_n].append(
            next(self.model.parameters()).dtype) or _f(self, *a, **k))
    result = evaluate(tmp_path / "run" / "artifact", task, "validation", progress=False)
    # the fast decoding runner scored (policy and reference), in the hardware policy's dtype (bf16 where the CPU
    # does it fast): the comparison below is that against fp32
    assert runs["decoder"] and not runs["transformers"] and set(runs["decoder"]) == {pick_dtype("auto", "cpu")}
    assert result.metric == "preference_accuracy" and result.n == 16 and 0 <= result.score <= 1
    assert result.extras["preference_scorer"] == "implicit_reward_margins"
    assert result.ci95[0] <= result.score <= result.ci95[1]
    # the margins are beta * (policy log-ratio gap - reference log-ratio gap), measured here by hand
    model, tokenizer = art.load_model(dtype="fp32", device="cpu")
    pairs = encode_pairs(task, art.program, tokenizer, "validation", max_length=1024)
    kwargs = {"pad_id": tokenizer.pad_token_id, "precision": FP32, "batch_size": 8, "accelerator": setup_accelerator()}
    policy = score_pairs(model, pairs, **kwargs)
    reference = reference_scores(model, [s for p in pairs for s in (p.chosen, p.rejected)], **kwargs)
    margins = 0.3 * ((policy.chosen - reference[0::2]) - (policy.rejected - reference[1::2]))
    found = torch.tensor([r.details["margin"] for r in result.records])
    torch.testing.assert_close(found, margins, atol=2e-2, rtol=5e-2)  # bf16 evaluation vs fp32 here
    assert (found > 0).tolist() == (margins > 0).tolist() or torch.all(margins.abs() < 1e-2)


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_resume_ends_at_the_same_weights_and_reuses_the_reference(task_yaml, tmp_path, adapter):
    args = ["max_steps=4", "save_every=2", "eval_every=2", "batch_size=4", "lr=1e-2", f"adapter={adapter}",
            "precision=fp32"]
    if adapter == "full":
        args[4] = "lr=1e-4"
    out = tmp_path / "run"
    align_task(str(task_yaml), "dpo", args, out=str(out))
    folder = "adapter" if adapter == "lora" else "model"
    straight = load_file(next((out / "artifact" / folder).glob("*.safetensors")))
    reference = torch.load(out / "reference_logps.pt", weights_only=False)
    # Pretend the run stopped after the checkpoint of step 2, then resume it.
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-000002"]
    shutil.rmtree(out / "artifact")
    align_task(str(task_yaml), "dpo", args, out=str(out), resume=True)
    resumed = load_file(next((out / "artifact" / folder).glob("*.safetensors")))
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    again = torch.load(out / "reference_logps.pt", weights_only=False)
    assert again["key"] == reference["key"]
    rows = read_metrics(out / "metrics.jsonl")
    assert next(r for r in rows if r.get("event") == "resume")["step"] == 2


def test_the_reference_is_computed_once_for_the_visited_pairs_only(task_yaml, tmp_path):
    out = tmp_path / "run"
    align_task(str(task_yaml), "dpo", ["max_steps=2", "batch_size=4", "eval_every=0", "r=4"], out=str(out))
    saved = torch.load(out / "reference_logps.pt", weights_only=False)["values"]
    train = saved["train"]["chosen"]
    assert train.shape == (32,) and int((~train.isnan()).sum()) == 8  # 2 steps x 4 pairs of 32
    assert not saved["validation"]["chosen"].isnan().any()
    event = next(r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "reference")
    assert event["pairs"] == 8 and event["seconds"] >= 0


def test_adapter_inputs_stay_in_bf16_with_identical_results(tiny_model_dir, task):
    from honellm.reward.recipes.common import keep_adapter_inputs_in_compute_dtype

    bf16 = Precision(torch.bfloat16, "cpu")
    model, tokenizer = _lora_model(tiny_model_dir)
    bf16.cast_model(model)
    pairs = _pairs(task, tokenizer)
    batch = collate_pairs(pairs, list(range(len(pairs))), tokenizer.pad_token_id,
                          {"chosen": torch.zeros(len(pairs)), "rejected": torch.zeros(len(pairs))})
    loss_fn = preference_loss_fn("dpo", {"beta": 0.1})

    def run():
        model.zero_grad()
        with bf16.autocast():
            out = loss_fn(model, batch)
        out.total.backward()
        return out.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = run()
    keep_adapter_inputs_in_compute_dtype(model)
    loss_after, grads_after = run()
    assert torch.equal(loss, loss_after) and grads.keys() == grads_after.keys()
    assert all(torch.equal(grads[n], grads_after[n]) for n in grads)


def test_a_config_file_may_name_the_method_and_overrides_win(tmp_path):
    from honellm.reward.recipes.preference import DPOConfig

    path = tmp_path / "dpo.yaml"
    path.write_text("method: dpo\nbeta: 0.3\nlr: 1.0e-4\n")
    spec, config = catalog.method_config(None, path, ["lr=2e-4"], family="reward")
    assert spec.name == "dpo" and isinstance(config, DPOConfig) and config.beta == 0.3 and config.lr == 2e-4
    path.write_text("method: dpo\nbetta: 0.3\n")
    with pytest.raises(HoneError) as info:
        catalog.method_config(None, path, family="reward")
    assert f"{path}:2" in info.value.what and "did you mean 'beta'" in info.value.fix


@pytest.mark.parametrize(("method", "first_loss"), [("dpo", 0.693147), ("cdpo", 0.693147), ("kto", 0.5)])
def test_the_reference_equals_the_policy_before_the_first_update(task_yaml, tmp_path, method, first_loss):
    """bf16: the reference is scored on the training micro-batches themselves, so the log-ratios start at 0."""
    out = tmp_path / "run"
    align_task(str(task_yaml), method, ["max_steps=1", "batch_size=4", "grad_accum=2", "eval_every=0", "r=4",
                                        "precision=bf16"], out=str(out))
    first = next(r for r in read_metrics(out / "metrics.jsonl") if "loss" in r)
    assert first["loss"] == first_loss
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0
    if method == "kto":
        assert first["kl"] == 0


@pytest.mark.parametrize("adapter", ["rslora", "dora"])
def test_other_lora_family_adapters_train_and_evaluate(task_yaml, task, tmp_path, adapter):
    out = tmp_path / "run"
    art = align_task(str(task_yaml), "dpo", [*QUICK, "eval_every=0", f"adapter={adapter}"], out=str(out))
    config = json.loads((out / "artifact" / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] == (adapter == "dora") and config["use_rslora"] == (adapter == "rslora")
    assert art.manifest.config["adapter"] == adapter
    result = evaluate(out / "artifact", task, "validation", limit=4, progress=False)
    assert result.n == 4 and result.extras["preference_scorer"] == "implicit_reward_margins"


# ------------------------------------------------------------------------------------------------ packing


def test_packed_pairs_give_the_padded_log_probs_and_gradients(tiny_model_dir, task):
    """A micro-batch of pairs packed end to end (the default on CUDA with a varlen kernel) scores each answer as
    the padded batch does: the same per-sequence sums, counts, DPO loss and gradients (fp32)."""
    model, tokenizer = _lora_model(tiny_model_dir)
    pairs = _pairs(task, tokenizer)
    reference = {"chosen": torch.full((len(pairs),), -20.0), "rejected": torch.full((len(pairs),), -21.0)}
    loss_fn = preference_loss_fn("dpo", {"beta": 0.1})
    found = {}
    for packed in (False, True):
        batch = collate_pairs(pairs, list(range(len(pairs))), tokenizer.pad_token_id, reference, packed=packed)
        assert batch.sequences.packed == packed
        model.zero_grad()
        out = loss_fn(model, batch)
        out.total.backward()
        found[packed] = (pair_logps(model, batch), out.total.detach(),
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (padded, padded_loss, padded_grads), (packed, packed_loss, packed_grads) = found[False], found[True]
    for name in ("chosen", "rejected", "chosen_lengths", "rejected_lengths"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_packing_true_trains_to_the_padded_runs_weights(task_yaml, tmp_path, method):
    args = ["max_steps=2", "batch_size=4", "eval_every=0", "r=4", "lr=1e-2", "precision=fp32"]
    padded = align_task(str(task_yaml), method, args, out=str(tmp_path / "padded"))
    packed = align_task(str(task_yaml), method, [*args, "packing=true"], out=str(tmp_path / "packed"))
    start = next(r for r in read_metrics(tmp_path / "packed" / "metrics.jsonl") if r.get("event") == "start")
    assert start["packing"] is True and start["unpacked_because"] is None
    steps = [[v for r in read_metrics(run / "metrics.jsonl") if "loss" in r for v in (r["loss"], r["grad_norm"])]
             for run in (tmp_path / "padded", tmp_path / "packed")]
    assert len(steps[0]) == 4 and steps[1] == pytest.approx(steps[0], rel=1e-5)
    # Adam divides each gradient by its own running size, so a near-zero gradient's summation-order difference
    # can move its weight by a fraction of the step (lr=1e-2; 0.15 of one on an AMD EPYC's fp32 kernels): every
    # weight agrees to half a step, and all but a few in a hundred to 1e-4.
    a = load_file(padded.path / "adapter" / "adapter_model.safetensors")
    b = load_file(packed.path / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        diff = (b[name] - a[name]).abs()
        assert diff.max() < 5e-3 and (diff > 1e-4).float().mean() < 0.02, (name, diff.max())
