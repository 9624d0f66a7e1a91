"""Online DPO: pairs kept together, the winner from the rewards, the loss equal to `dpo_loss` on the pairs, and the
recipe end to end on the tiny model (reward functions, and a judge as the reward)."""

from __future__ import annotations

import math

import pytest
import torch

from honellm.errors import HoneError
from honellm.generation import Generator, SamplingParams
from honellm.methods.catalog import get_method, run_method
from honellm.reward import losses
from honellm.reward.recipes.online_dpo import OnlineDPOConfig, online_dpo_loss, pair_advantages
from honellm.reward.rollout import (
    completion_logprobs,
    encode_prompts,
    generate_rollouts,
    load_policy,
    rollout_batches,
)
from honellm.runs import read_metrics
from honellm.task import Task
from honellm.testing import make_tiny_reward_task
from honellm.training.precision import Precision

FP32 = Precision.resolve("fp32", torch.device("cpu"))
SHORTER = "def shorter(prompts, completions, **kw):\n    return [-float(len(c)) for c in completions]\n"


def test_pair_advantages_mark_the_winner_and_ties():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, float("nan"), 1.0, float("nan"), float("nan")])
    adv = pair_advantages(rewards, config=OnlineDPOConfig(), seq_kl=None)
    assert adv.values.tolist() == [1.0, -1.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0]
    assert losses.zero_variance_groups(rewards, 2).tolist() == [False, False, True, True, False, False, True, True]


def test_rollout_batches_keep_pairs_together_and_in_order():
    prompts = [[1, 2]] * 6
    completions = [[5] * n for n in (1, 7, 2, 2, 9, 1)]
    batches = rollout_batches(prompts, completions, batch_size=3, pad_id=0, together=2)
    rows = [b.rows for b in batches]
    assert rows == [[4, 5], [0, 1], [2, 3]]  # the longest pair first; 3 rounds down to one pair per batch
    assert all(b.mask.shape[0] == 2 for b in batches)


@pytest.fixture(scope="module")
def pairs(tiny_model_dir, tmp_path_factory):
    task = Task.load(make_tiny_reward_task(tmp_path_factory.mktemp("odpo"), tiny_model_dir))
    torch.manual_seed(0)
    model, tokenizer = load_policy(task, OnlineDPOConfig(r=4, precision="fp32"), FP32, torch.device("cpu"))
    from honellm.program import PromptProgram

    prompts = encode_prompts(task, PromptProgram.from_task(task), tokenizer, "train", limit=3)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    rollouts = generate_rollouts(Generator(model, tokenizer, backend="torch"), prompts, params, 2, precision=FP32)
    return model, tokenizer, rollouts


def test_online_dpo_loss_is_dpo_loss_on_the_pairs(pairs):
    model, tokenizer, rollouts = pairs
    batches = rollout_batches(rollouts.per_completion(rollouts.prompts.ids), rollouts.token_ids, batch_size=4,
                              pad_id=tokenizer.pad_token_id, together=2)
    rewards = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0, 3.0])
    adv = pair_advantages(rewards, config=OnlineDPOConfig(), seq_kl=None)
    torch.manual_seed(1)
    outs, chosen, rejected, ref_c, ref_r = [], [], [], [], []
    for b in batches:
        b.data["advantages"] = adv.values[b.rows]
        b.data["ref_logps"] = torch.randn(b.mask.shape) * 0.1 - 3.0
        b.num_loss_units = len(b.rows) // 2
        outs.append(online_dpo_loss(model, b, config=OnlineDPOConfig(beta=0.2)))
        with torch.no_grad():
            seq = (completion_logprobs(model, b) * b.mask).sum(-1)
        ref = (b.data["ref_logps"] * b.mask).sum(-1)
        for k in range(0, len(b.rows), 2):
            w, lo = (k, k + 1) if rewards[b.rows[k]] > rewards[b.rows[k + 1]] else (k + 1, k)
            chosen.append(seq[w]), rejected.append(seq[lo]), ref_c.append(ref[w]), ref_r.append(ref[lo])
    recipe = sum(o.total for o in outs) / sum(o.count for o in outs)
    expected, _ = losses.dpo_loss(torch.stack(chosen), torch.stack(rejected), torch.stack(ref_c),
                                  torch.stack(ref_r), beta=0.2)
    torch.testing.assert_close(recipe.detach(), expected, atol=1e-5, rtol=1e-5)
    assert recipe.requires_grad and sum(o.count for o in outs) == 3


def test_online_dpo_trains_on_reward_functions_and_logs(tiny_model_dir, tmp_path):
    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir, reward_code=SHORTER,
                                           rewards=[{"python": "rewards.py:shorter"}], max_new_tokens=6))
    config = OnlineDPOConfig(max_steps=2, prompts_per_step=4, batch_size=4, r=4, precision="fp32", lr=1e-3,
                             eval_every=0)
    artifact = run_method(task, "online_dpo", config, out=tmp_path / "run")
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["updates"] == 1 and math.isfinite(r["loss"]) for r in train if r["dropped_groups"] < 1)
    assert any("rewards/accuracies" in r for r in train)
    assert artifact.kind == "adapter" and get_method("online_dpo").family == "reward"


def test_online_dpo_with_a_judge_as_the_reward(tiny_model_dir, tmp_path):
    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir, max_new_tokens=4,
                                           rewards=[{"name": "judge", "judge": {"model": str(tiny_model_dir),
                                                                                "mode": "pointwise"}}]))
    config = OnlineDPOConfig(max_steps=1, prompts_per_step=2, batch_size=4, r=4, precision="fp32", eval_every=0)
    run_method(task, "online_dpo", config, out=tmp_path / "run")
    (train,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "train"]
    assert 0 <= train["reward"] <= 1  # the judge's rating, scaled
    assert train["dropped_groups"] < 1  # ratings of two different answers differ


def test_online_dpo_config_errors():
    with pytest.raises(Exception, match="mask_truncated"):
        OnlineDPOConfig(mask_truncated=True)
    with pytest.raises(Exception, match="less than or equal to 2"):
        OnlineDPOConfig(group_size=4)
    with pytest.raises(HoneError):
        losses.get_preference_loss("dpoo")
