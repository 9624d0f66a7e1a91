"""The reward model on the tiny model: pooling, one-forward Bradley-Terry loss, the recipe, save/load round trip,
`hone eval` scoring, and the `score` API the online recipes use."""

from __future__ import annotations

import json

import pytest
import torch

from honellm.artifact import Artifact
from honellm.evaluation.evaluate import evaluate
from honellm.models import load
from honellm.program import PromptProgram
from honellm.reward.losses import bradley_terry_loss
from honellm.reward.recipes import align_task
from honellm.reward.recipes.common import AlignConfig, collate_pairs, encode_pairs
from honellm.reward.recipes.reward_model import reward_model_loss
from honellm.reward.reward_model import HEAD_FILE, INFO_FILE, RewardModel, load_reward_model
from honellm.runs import read_metrics
from honellm.task import Task
from honellm.testing import make_tiny_preference_task
from honellm.training.batching import collate
from honellm.training.precision import Precision
from honellm.training.setup import seed_everything
from honellm.tuning import get_method

FP32 = Precision(torch.float32, "cpu")
PROMPTS = [[{"role": "user", "content": "Review: a warm film"}], [{"role": "user", "content": "Review: dull and long"}],
           [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. 0123456789"}]]
ANSWERS = ["positive", "negative, and far too long", "neutral"]


@pytest.fixture(scope="module")
def task_yaml(tiny_model_dir, tmp_path_factory):
    return make_tiny_preference_task(tmp_path_factory.mktemp("prefs"), tiny_model_dir)


def _reward_model(tiny_model_dir, program=None) -> RewardModel:
    seed_everything(0)
    model, tokenizer = load(tiny_model_dir, dtype="fp32", device="cpu")
    model = get_method("lora").apply(model, AlignConfig(r=4), str(tiny_model_dir))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return RewardModel(model, tokenizer, program=program, max_length=128, precision=FP32)


def test_the_score_is_read_at_each_sequence_s_last_token(tiny_model_dir):
    rm = _reward_model(tiny_model_dir)
    sequences = [rm.encode(p, a) for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    batch = collate(sequences, rm.tokenizer.pad_token_id)
    together = rm(batch.input_ids, batch.attention_mask)
    alone = torch.cat([rm(b.input_ids, b.attention_mask) for b in (collate([s], 0) for s in sequences)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert together.dtype == torch.float32 and together.shape == (3,)
    # the last real token is the end-of-turn token after the answer
    assert all(s.input_ids[-1] == rm.tokenizer.convert_tokens_to_ids("<|im_end|>") for s in sequences)
    assert rm.score(PROMPTS, ANSWERS, batch_size=2) == pytest.approx(together.tolist(), rel=1e-5, abs=1e-5)


def test_recipe_loss_scores_chosen_and_rejected_in_one_forward(tiny_model_dir, task_yaml):
    rm = _reward_model(tiny_model_dir)
    task = Task.load(task_yaml)
    pairs = encode_pairs(task, PromptProgram.from_task(task), rm.tokenizer, "train", max_length=64, limit=5)
    calls = []
    hook = rm.backbone().register_forward_hook(lambda *_: calls.append(1))
    try:
        out = reward_model_loss(rm, collate_pairs(pairs, list(range(5)), rm.tokenizer.pad_token_id),
                                center_coefficient=0.01)
    finally:
        hook.remove()
    assert len(calls) == 1 and out.count == 5
    chosen = torch.tensor(rm.score_sequences([p.chosen for p in pairs]))
    rejected = torch.tensor(rm.score_sequences([p.rejected for p in pairs]))
    expected, metrics = bradley_terry_loss(chosen, rejected, center_coefficient=0.01)
    torch.testing.assert_close(out.total / 5, expected.float(), rtol=1e-5, atol=1e-6)
    assert out.metrics["rewards/accuracies"] / 5 == pytest.approx(float(metrics["accuracy"]))
    assert out.metrics["rewards/margins"] / 5 == pytest.approx(float(metrics["margin"]), rel=1e-4, abs=1e-6)
    out.total.backward()
    assert rm.head.weight.grad is not None and rm.head.weight.grad.abs().sum() > 0


def test_save_and_load_give_identical_scores(tiny_model_dir, tmp_path):
    program = PromptProgram(system="Score the reply.")
    rm = _reward_model(tiny_model_dir, program)
    rm.stats = {"score_mean": 0.5, "score_std": 2.0}
    before = rm.score(PROMPTS, ANSWERS)
    artifact = Artifact.create(name="rm", method="reward_model", kind="reward_model", base_model=str(tiny_model_dir),
                               program=program)
    artifact.save(tmp_path / "rm", model=rm.model, extra_files=rm.head_files())
    assert (tmp_path / "rm" / "adapter").is_dir() and (tmp_path / "rm" / HEAD_FILE).exists()
    info = json.loads((tmp_path / "rm" / INFO_FILE).read_text())
    assert info["pooling"] == "last_token" and info["max_length"] == 128 and info["score_mean"] == 0.5
    loaded = load_reward_model(tmp_path / "rm", dtype="fp32", device="cpu")
    assert loaded.program.system == "Score the reply." and not loaded.training
    assert loaded.score(PROMPTS, ANSWERS) == before
    normalized = loaded.score(PROMPTS, ANSWERS, normalize=True)
    assert normalized == pytest.approx([(s - 0.5) / 2.0 for s in before])
    # the program's system message is applied once: given again, the conversation scores the same
    with_system = [[{"role": "system", "content": "Score the reply."}, *p] for p in PROMPTS]
    assert loaded.score(with_system, ANSWERS) == before
    reward = loaded.reward_function()
    assert reward(["Review: a warm film"], [[{"role": "assistant", "content": "positive"}]]) == pytest.approx([before[0]])


def test_the_recipe_trains_saves_and_hone_eval_scores_the_reward_model(task_yaml, tmp_path):
    out = tmp_path / "run"
    art = align_task(str(task_yaml), "reward_model", ["max_steps=3", "batch_size=4", "eval_every=1", "r=4",
                                                      "lr=1e-2"], out=str(out))
    assert art.kind == "reward_model" and art.manifest.method == "reward_model"
    for name in ("adapter", HEAD_FILE, INFO_FILE, "hone.json", "prompt.json"):
        assert (out / "artifact" / name).exists(), name
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "tokens_per_second"):
        assert all(key in r for r in steps), key
    assert [r["step"] for r in rows if r.get("event") == "eval"] == [1, 2, 3]
    metrics = art.manifest.metrics
    assert 0 <= metrics["val_accuracy"] <= 1 and metrics["score_std"] > 0

    task = Task.load(task_yaml)
    rm = load_reward_model(out / "artifact", dtype="fp32", device="cpu")
    result = evaluate(out / "artifact", task, "validation", progress=False, model=rm.model, tokenizer=rm.tokenizer)
    assert result.metric == "preference_accuracy" and result.extras["preference_scorer"] == "reward_model_margins"
    pairs = task.pairs("validation")
    chosen = rm.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = rm.score([p.prompt for p in pairs], [p.rejected for p in pairs])
    margins = [r.details["margin"] for r in result.records]
    assert margins == pytest.approx([round(c - r, 4) for c, r in zip(chosen, rejected, strict=True)], abs=2e-4)
    assert result.score == pytest.approx(sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs))


def test_a_fully_fine_tuned_reward_model_round_trips(task_yaml, tmp_path):
    out = tmp_path / "run"
    align_task(str(task_yaml), "reward_model", ["max_steps=1", "batch_size=4", "eval_every=0", "adapter=full",
                                                "lr=1e-4"], out=str(out))
    assert (out / "artifact" / "model").is_dir() and not (out / "artifact" / "adapter").exists()
    rm = load_reward_model(out / "artifact", dtype="fp32", device="cpu")
    assert rm.stats["score_std"] >= 0 and len(rm.score(PROMPTS, ANSWERS)) == 3


def test_the_reward_model_learns_a_plain_preference(tiny_model_dir, tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    for split, n in (("train", 16), ("validation", 8)):
        rows = [{"prompt": f"Question {i}: is it a warm film?", "chosen": "yes", "rejected": "no"} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "task.yaml").write_text(f"name: yes-no\nmodel: {tiny_model_dir}\n"
                                      "data: {train: train.jsonl, validation: validation.jsonl}\n")
    art = align_task(str(folder / "task.yaml"), "reward_model", ["max_steps=6", "batch_size=4", "eval_every=6",
                                                                  "lr=1e-2", "r=4", "warmup_ratio=0"],
                     out=str(tmp_path / "run"))
    assert art.manifest.metrics["val_accuracy"] == 1.0
