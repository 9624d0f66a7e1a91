"""Online RL on the tiny model: rollout layout, KL at step 0, the recipes' advantages and losses against the pure
functions of `honellm.reward.losses`, PPO's shared policy/value forward, best-of-n selection, config checks."""

from __future__ import annotations

import json

import pytest
import torch

from honellm.generation import Generator, SamplingParams
from honellm.reward import losses
from honellm.reward.recipes.grpo import (
    GRPOConfig,
    RLOOConfig,
    grpo_loss,
    grpo_step_advantages,
    loss_units,
    rloo_loss,
    rloo_step_advantages,
)
from honellm.reward.recipes.ppo import PolicyWithValueHead, PPOConfig, policy_and_values, ppo_loss
from honellm.reward.rollout import (
    completion_logprobs,
    encode_prompts,
    generate_rollouts,
    gold_reward,
    held_out_check,
    load_policy,
    no_grad_logprobs,
    proxy_reward,
    rollout_batches,
    sampling_params,
)
from honellm.task import Task
from honellm.testing import make_tiny_reward_task
from honellm.training.precision import Precision

FP32 = Precision(torch.float32, "cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def task(tiny_model_dir, tmp_path_factory):
    path = make_tiny_reward_task(tmp_path_factory.mktemp("rl-task"), tiny_model_dir,
                                 rewards=[{"name": "numeric_match"},
                                          {"name": "length_penalty", "target": 4, "unit": "token", "weight": 0.5}])
    return Task.load(path)


@pytest.fixture(scope="module")
def policy(task):
    """(peft model, tokenizer) in fp32 with a fresh LoRA adapter (B = 0: the policy equals the reference)."""
    torch.manual_seed(0)
    return load_policy(task, GRPOConfig(r=4, precision="fp32"), FP32, torch.device("cpu"))


@pytest.fixture(scope="module")
def rollouts(task, policy):
    from honellm.program import PromptProgram

    model, tokenizer = policy
    prompts = encode_prompts(task, PromptProgram.from_task(task), tokenizer, "train", limit=3)
    generator = Generator(model, tokenizer, backend="torch")
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, logprobs=True)
    return generate_rollouts(generator, prompts, params, 4, precision=FP32)


def _batches(rollouts, pad_id, batch_size=5):
    prompt_ids = rollouts.per_completion(rollouts.prompts.ids)
    return rollout_batches(prompt_ids, rollouts.token_ids, batch_size=batch_size, pad_id=pad_id)


def test_completion_logprobs_line_up_with_the_sampler(policy, rollouts):
    """(B, T) log-probs from the training forward equal the Generator's per-token log-probs, token for token."""
    model, tokenizer = policy
    batches = _batches(rollouts, tokenizer.pad_token_id)
    assert sorted(i for b in batches for i in b.rows) == list(range(len(rollouts)))
    with torch.no_grad():
        for b in batches:
            logps = completion_logprobs(model, b)
            for j, i in enumerate(b.rows):
                expected = torch.tensor(rollouts.completions[i].logprobs)
                n = len(expected)
                assert b.mask[j].sum() == n
                torch.testing.assert_close(logps[j, :n], expected, atol=1e-4, rtol=1e-4)
                assert torch.all(logps[j, n:] == 0)


@pytest.mark.parametrize("together", [1, 2])
def test_packed_rollout_batches_give_the_padded_log_probs_and_entropies(policy, rollouts, together):
    """GRPO/RLOO/online DPO's micro-batches packed end to end (the default on CUDA with a varlen kernel): the same
    (B, T) log-probs and entropies as the padded ones, with the same completion masks (a truncated completion's
    loss taken away, pairs kept together) and row order."""
    model, tokenizer = policy
    prompt_ids = rollouts.per_completion(rollouts.prompts.ids)
    keep = [i % 5 != 2 for i in range(len(rollouts))]
    found = {}
    for packed in (False, True):
        batches = rollout_batches(prompt_ids, rollouts.token_ids, batch_size=5, pad_id=tokenizer.pad_token_id,
                                  loss_mask=keep, together=together, packed=packed)
        assert all(b.batch.packed == packed for b in batches)
        with torch.no_grad():
            found[packed] = [(b.rows, b.mask, *completion_logprobs(model, b, with_entropy=True)) for b in batches]
    assert len(found[True]) == len(found[False])
    for (rows, mask, logps, entropy), (rows_p, mask_p, logps_p, entropy_p) in zip(found[False], found[True],
                                                                                 strict=True):
        assert rows_p == rows and torch.equal(mask_p, mask)
        torch.testing.assert_close(logps_p, logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy_p, entropy, rtol=1e-5, atol=1e-5)


def test_kl_to_the_reference_is_zero_at_step_zero(task, policy, rollouts):
    """A fresh LoRA adapter (B = 0) leaves the policy equal to the reference (the adapter disabled): KL = 0."""
    model, tokenizer = policy
    batches = _batches(rollouts, tokenizer.pad_token_id)
    mine = no_grad_logprobs(model, batches, precision=FP32, device="cpu")
    ref = no_grad_logprobs(model, batches, precision=FP32, device="cpu", reference=True)
    for b, p, r in zip(batches, mine, ref, strict=True):
        assert float((losses.kl_k3(p, r) * b.mask).sum()) == 0.0
    # ... and the held-out check reports it so
    from honellm.program import PromptProgram

    held_out = encode_prompts(task, PromptProgram.from_task(task), tokenizer, "validation", limit=4)
    generator = Generator(model, tokenizer, backend="torch")
    params = sampling_params(GRPOConfig(), task, seed=0)
    stats = held_out_check(model, generator, task, held_out, params, proxy=proxy_reward(task, GRPOConfig()),
                           gold=gold_reward(task), precision=FP32, device="cpu", batch_size=8,
                           pad_id=tokenizer.pad_token_id)
    assert stats["kl"] == 0.0
    assert set(stats) == {"proxy", "gold", "kl", "mean_length", "distinct_n", "entropy"}
    assert stats["gold"] is not None and stats["entropy"] > 0


@pytest.mark.parametrize("loss", sorted(losses.POLICY_LOSSES))
def test_grpo_advantages_and_loss_are_the_pure_functions(policy, rollouts, loss):
    """The recipe's advantages are `grpo_advantages` (unscaled for dr_grpo); its loss, summed over micro-batches
    and divided by the step's loss units (what TrainStep does), is `policy_loss` on the whole batch at once, for
    every member of the family, with the KL term and the entropy bonus."""
    model, tokenizer = policy
    max_new = 7
    config = GRPOConfig(loss=loss, kl_coef=0.1, group_size=4, entropy_coef=0.01).resolved(max_new)
    rewards = torch.tensor([1.0, 0.0, 0.5, float("nan"), 0.2, 0.2, 0.2, 0.2, 1.0, 0.0, 0.0, 0.0])
    adv = grpo_step_advantages(rewards, config=config, seq_kl=None)
    torch.testing.assert_close(adv.values, losses.grpo_advantages(rewards, 4, scale=loss != "dr_grpo"))
    batches = _batches(rollouts, tokenizer.pad_token_id)
    torch.manual_seed(1)
    for b in batches:
        b.data["advantages"] = adv.values[b.rows]
        b.data["ref_logps"] = torch.randn(b.mask.shape) * 0.1 - 3.0
        b.data["old_logps"] = torch.randn(b.mask.shape) * 0.1 - 3.0
        b.num_loss_units = loss_units(config, b, max_new)
    outs = [grpo_loss(model, b, config=config) for b in batches]
    recipe = sum(o.total for o in outs) / sum(o.count for o in outs)

    # the whole batch in one (N, T) tensor, rows in rollout order
    n, t = len(rollouts), max(b.mask.shape[1] for b in batches)
    logps, old, ref, mask, entropy = (torch.zeros(n, t) for _ in range(5))
    for b in batches:
        width = b.mask.shape[1]
        with torch.no_grad():
            logps[b.rows, :width], entropy[b.rows, :width] = completion_logprobs(model, b, with_entropy=True)
        old[b.rows, :width], ref[b.rows, :width] = b.data["old_logps"], b.data["ref_logps"]
        mask[b.rows, :width] = b.mask
    settings = losses.PolicyLossSettings(clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high,
                                         max_length=max_new)
    policy_term, metrics = losses.policy_loss(loss, logps, old, adv.values, mask, settings, kl_coef=0.1,
                                              ref_logps=ref)
    if loss in ("dapo", "bnpo", "cispo"):  # token units: the bonus is the update's token mean
        expected = policy_term - 0.01 * losses.token_mean(entropy, mask)
    else:  # sequence (or rows x max_length) units: each micro-batch's token mean, weighted by its units
        expected = policy_term - 0.01 * sum(
            losses.token_mean(entropy[b.rows, :b.mask.shape[1]], b.mask) * b.num_loss_units for b in batches
        ) / sum(b.num_loss_units for b in batches)
    torch.testing.assert_close(recipe.detach(), expected, atol=1e-5, rtol=1e-5)
    assert recipe.requires_grad
    if loss in ("dapo", "bnpo", "cispo"):  # token-weighted means equal the whole batch's
        recipe_clip = sum(o.metrics["clip_fraction"] for o in outs) / sum(o.count for o in outs)
        assert recipe_clip == pytest.approx(float(metrics["clip_ratio/region_mean"]), abs=1e-6)
        recipe_kl = sum(o.metrics["kl"] for o in outs) / sum(o.count for o in outs)
        assert recipe_kl == pytest.approx(float(metrics["kl"]), rel=1e-5)
    assert all("entropy" in o.metrics and o.metrics["entropy"] > 0 for o in outs)


def test_rloo_advantages_and_loss_follow_trl(policy, rollouts):
    """RLOO: the sequence KL comes off the reward before the leave-one-out baseline; the ratio is per sequence,
    the loss a mean over sequences. The oracle is TRL's own `RLOOTrainer._compute_loss`, called on each
    micro-batch with the policy's per-token log-probs, and TRL's advantage lines (replayed in
    test_reward_losses.py: they sit inside its generation method) on the KL-penalised rewards."""
    from trl import RLOOTrainer

    from tests.unit.test_reward_losses import trainer_namespace, trl_rloo_advantages

    model, tokenizer = policy
    config = RLOOConfig(kl_coef=0.05, group_size=4)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.2, 0.2, 0.7, 0.2, 1.0, 0.0, 0.0, 1.0])
    seq_kl = torch.linspace(0.0, 1.1, 12)
    adv = rloo_step_advantages(rewards, config=config, seq_kl=seq_kl)
    torch.testing.assert_close(adv.values, trl_rloo_advantages(rewards - 0.05 * seq_kl, 4))
    batches = _batches(rollouts, tokenizer.pad_token_id)
    for b in batches:
        b.data["advantages"] = adv.values[b.rows]
        b.data["old_logps"] = torch.full(b.mask.shape, -3.0) * b.mask
        b.num_loss_units = int(b.mask.sum(-1).gt(0).sum())
    outs = [rloo_loss(model, b, config=config) for b in batches]
    recipe = sum(o.total for o in outs) / sum(o.count for o in outs)
    trl_losses, sizes, clipped = [], [], 0
    with torch.no_grad():
        for b in batches:
            logps = completion_logprobs(model, b)
            trainer = trainer_namespace(
                _get_per_token_logps_and_entropies=lambda *a, _l=logps, **k: (_l, torch.zeros_like(_l), None),
                epsilon_low=config.clip_eps, epsilon_high=config.clip_eps)  # RLOO's clip is symmetric
            rows, width = b.mask.shape
            inputs = {"prompt_ids": torch.ones(rows, 1, dtype=torch.long),
                      "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
                      "completion_ids": torch.ones(rows, width, dtype=torch.long), "completion_mask": b.mask,
                      "old_logps": (b.data["old_logps"] * b.mask).sum(-1), "advantages": b.data["advantages"]}
            trl_losses.append(RLOOTrainer._compute_loss(trainer, None, inputs))
            sizes.append(rows)
            clipped += trainer._metrics["train"]["clip_ratio/region_mean"][-1] * rows
    expected = sum(loss * n for loss, n in zip(trl_losses, sizes, strict=True)) / sum(sizes)
    torch.testing.assert_close(recipe.detach(), expected, atol=1e-5, rtol=1e-5)
    assert 0 < clipped < sum(sizes)  # the clip is exercised: some sequences clipped, some not
    assert recipe.requires_grad


def test_ppo_forward_and_loss_are_the_pure_functions(policy, rollouts):
    """The shared policy/value forward gives the policy's own log-probs; the loss is ppo_policy_loss +
    vf_coef * ppo_value_loss, token means over the whole update."""
    model, tokenizer = policy
    both = PolicyWithValueHead(model)
    torch.nn.init.normal_(both.value_head.weight, std=0.1)
    batches = _batches(rollouts, tokenizer.pad_token_id)
    config = PPOConfig(vf_coef=0.3)
    totals, counts = [], []
    cat = {k: [] for k in ("logps", "values", "old", "old_values", "adv", "ret", "mask")}
    torch.manual_seed(2)
    for b in batches:
        with torch.no_grad():
            logps, values = policy_and_values(both, b)
            torch.testing.assert_close(logps, completion_logprobs(model, b), atol=1e-5, rtol=1e-5)
        rewards = losses.kl_penalised_rewards(torch.rand(len(b.rows)), logps, logps - 0.01, b.mask)
        adv, ret = losses.gae(rewards, values, b.mask)
        b.data |= {"old_logps": logps - 0.05 * torch.rand(logps.shape), "old_values": values + 0.1,
                   "advantages": adv, "returns": ret}
        out = ppo_loss(both, b, config=config)
        totals.append(out.total)
        counts.append(out.count)
        for key, value in (("logps", logps), ("values", values), ("old", b.data["old_logps"]),
                           ("old_values", b.data["old_values"]), ("adv", adv), ("ret", ret), ("mask", b.mask)):
            cat[key].append(torch.nn.functional.pad(value, (0, 8 - value.shape[1])))
    c = {k: torch.cat(v) for k, v in cat.items()}
    policy_loss, _ = losses.ppo_policy_loss(c["logps"], c["old"], c["adv"], c["mask"])
    value_loss, _ = losses.ppo_value_loss(c["values"], c["old_values"], c["ret"], c["mask"])
    torch.testing.assert_close((sum(totals) / sum(counts)).detach(), policy_loss + 0.3 * value_loss,
                               atol=1e-5, rtol=1e-5)


class _FakeGenerator:
    """Completions whose text is the sample index: reward functions can pick a known one."""

    eos_ids = {0}
    tokenizer = None

    def generate(self, prompts, params, *, shared_prefix=None, progress=False):
        from honellm.generation import Completion

        return [Completion(text=f"answer {i % 3}", token_ids=[5, 6], finish_reason="stop", prompt_tokens=3,
                           completion_tokens=2) for i in range(len(prompts))]


def test_best_of_n_keeps_the_highest_reward_and_counts_every_sample(task):
    from honellm.reward.functions import CombinedReward
    from honellm.runtime.best_of_n import BestOfNGenerator
    from honellm.runtime.rewards import RewardSource

    def digit(prompts, completions, **columns):  # the sample "answer 2" scores best, "answer 1" is unscorable
        return [None if c.endswith("1") else float(c[-1]) for c in completions]

    wrapped = BestOfNGenerator(_FakeGenerator(), RewardSource(CombinedReward(["digit"], [digit], [1.0])), n=3,
                               temperature=0.7, task=task)
    out = wrapped.generate(["q1", "q2"], SamplingParams(max_new_tokens=4), records=[{"a": 1}, {"a": 2}])
    assert [c.text for c in out] == ["answer 2", "answer 2"]
    assert all(c.completion_tokens == 6 for c in out)  # the cost of all three samples
    assert wrapped.takes_context and wrapped.eos_ids == {0}


def test_inference_hook_leaves_ordinary_artifacts_alone(task):
    from honellm.artifact import Artifact
    from honellm.program import BestOfNSettings, InferenceSettings
    from honellm.runtime.best_of_n import BestOfNGenerator, inference_generator

    plain = Artifact.zero_shot(task.config.model, task)
    sentinel = object()
    assert inference_generator(plain, sentinel, task=task) is sentinel
    plain.manifest.inference = InferenceSettings(best_of_n=BestOfNSettings(n=2, temperature=1.0, task_rewards=True))
    assert isinstance(inference_generator(plain, _FakeGenerator(), task=task), BestOfNGenerator)


def test_configs_refuse_what_online_rl_cannot_do():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="grad_accum"):
        GRPOConfig(grad_accum=2)
    with pytest.raises(ValidationError, match="group_size"):
        RLOOConfig(group_size=1)
    with pytest.raises(ValidationError, match="mini_batches"):
        GRPOConfig(prompts_per_step=1, group_size=2, mini_batches=4)
    assert GRPOConfig(guard={"action": "stop", "every": 3}).check_every == 3
    assert json.loads(GRPOConfig().model_dump_json())["guard"]["every"] == 10
