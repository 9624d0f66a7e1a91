"""The online recipes end to end on the tiny model (library calls): metrics lines, KL at step 0, the guard
stopping a hacked run and keeping the pre-hack weights, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from honellm.reward import losses
from honellm.reward.guard import GuardConfig
from honellm.reward.recipes.grpo import GRPOConfig, grpo
from honellm.runs import read_metrics
from honellm.task import Task
from honellm.testing import make_tiny_reward_task

# A scripted hack. The proxy pays more at every held-out check (as a gamed proxy does while the policy learns the
# trick), plus a little for the completion's tokens so that groups differ and the policy trains. The gold signal
# rises for three checks, then falls: the hack has started to break the real task at the fourth check.
HACK = '''
CHECKS = {"n": 0}
GOLD = [0.2, 0.4, 0.6, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def proxy(prompts, completions, completion_ids, **kwargs):
    return [0.2 * CHECKS["n"] + 0.01 * (sum(ids) % 7) for ids in completion_ids]


def gold(prompts, completions, **kwargs):
    value = GOLD[CHECKS["n"]]
    CHECKS["n"] += 1
    return [value] * len(completions)
'''

ONLY_DIVERGENCE = {"kl_budget": None, "max_length_ratio": None, "min_length_ratio": None, "min_distinct_ratio": None,
                   "min_entropy_ratio": None}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def _small(**kw):
    base = dict(max_steps=2, prompts_per_step=2, group_size=4, batch_size=8, guard_prompts=4, r=4,
                max_new_tokens=6, precision="fp32")
    return GRPOConfig(**(base | kw))


def test_grpo_logs_train_and_guard_lines_with_zero_kl_at_the_start(tiny_model_dir, tmp_path):
    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir))
    artifact = grpo(task, _small(kl_coef=0.1, eval_every=1, lr=1e-3, dynamic_sampling=False), out=tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"]
    guard = [r for r in rows if r.get("kind") == "guard"]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in guard] == [0, 1, 2]
    # step 1's loss is taken before the first update: the policy is still the reference
    assert train[0]["kl"] == 0.0 and guard[0]["kl"] == 0.0
    for key in ("loss", "reward", "reward_std", "rewards/numeric_match", "clip_fraction", "completion_length",
                "generation_share", "generation_tokens_per_second", "training_tokens_per_second"):
        assert key in train[0], key
    assert set(guard[0]) >= {"proxy", "gold", "kl", "mean_length", "distinct_n", "entropy"}
    assert [r for r in rows if r.get("kind") == "guard_summary"][0]["best_step"] is not None
    assert artifact.kind == "adapter" and (tmp_path / "run" / "artifact" / "adapter").is_dir()
    assert 0 < artifact.manifest.cost["generation_share"] < 1


@pytest.mark.parametrize("loss", sorted(losses.POLICY_LOSSES))
def test_every_policy_loss_trains_and_reports_entropy_clip_and_kl(tiny_model_dir, tmp_path, loss):
    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir))
    config = _small(loss=loss, kl_coef=0.05, entropy_coef=0.01, dynamic_sampling=False, max_steps=1, eval_every=0,
                    lr=1e-3)
    grpo(task, config, out=tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    (train,) = [r for r in rows if r.get("kind") == "train"]
    assert math.isfinite(train["loss"]) and train["updates"] == 1
    assert train["entropy"] > 0 and 0 <= train["clip_fraction"] <= 1 and train["kl"] == pytest.approx(0, abs=1e-6)


CONSTANT = "def constant(prompts, completions, **kw):\n    return [1.0 for _ in completions]\n"


def test_dynamic_sampling_leaves_out_groups_whose_rewards_are_all_equal(tiny_model_dir, tmp_path):
    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir, reward_code=CONSTANT,
                                           rewards=[{"python": "rewards.py:constant"}]))
    grpo(task, _small(loss="dapo", overlong_buffer=0, eval_every=0), out=tmp_path / "run")
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "train"]
    assert [r["dropped_groups"] for r in train] == [1.0, 1.0] and [r["updates"] for r in train] == [0, 0]


def test_overlong_shaping_costs_the_completions_that_reach_the_limit(tiny_model_dir, tmp_path):
    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir, reward_code=CONSTANT,
                                           rewards=[{"python": "rewards.py:constant"}]))
    grpo(task, _small(loss="dapo", overlong_buffer=4, max_steps=1, eval_every=0), out=tmp_path / "run")
    (train,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("kind") == "train"]
    assert train["reward"] == 1.0  # the task's reward is logged as it is; the shaping separately
    # a random policy mostly runs to max_new_tokens (6): those completions lose the whole penalty
    assert -1.0 <= train["rewards/overlong"] < 0


def test_the_guard_stops_a_hacked_run_and_keeps_the_pre_hack_weights(tiny_model_dir, tmp_path):
    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir, reward_code=HACK,
                                           rewards=[{"python": "rewards.py:proxy"}],
                                           gold_rewards=[{"python": "rewards.py:gold"}]))
    guard = GuardConfig(every=1, window=3, smooth=1, action="stop", **ONLY_DIVERGENCE)
    config = _small(max_steps=10, lr=1e-2, kl_coef=0.0, guard=guard, save_every=1, keep_checkpoints=20)
    artifact = grpo(task, config, out=tmp_path / "run")

    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    alarms = [r for r in rows if r.get("kind") == "alarm"]
    assert alarms and alarms[0]["alarm"] == "proxy_gold_divergence" and alarms[0]["step"] == 3
    assert alarms[0]["message"]
    assert [r["gold"] for r in rows if r.get("kind") == "guard"] == [0.2, 0.4, 0.6, 0.3]
    assert [r for r in rows if r.get("kind") == "guard_summary"][0]["best_step"] == 2
    assert any(r.get("event") == "guard_stop" for r in rows)
    metrics = artifact.manifest.metrics
    assert metrics["stopped_by_guard"] and metrics["final_step"] == 3 and metrics["selected_step"] == 2

    # the artifact holds the weights of step 2, not the (trained further) weights of step 3, nor the initial ones
    kept = load_file(tmp_path / "run" / "artifact" / "adapter" / "adapter_model.safetensors")
    at_2 = load_file(tmp_path / "run" / "checkpoints" / "step-000002" / "trainable.safetensors")
    at_1 = load_file(tmp_path / "run" / "checkpoints" / "step-000001" / "trainable.safetensors")
    lora_b = sorted(k for k in at_2 if "lora_B" in k)
    assert lora_b and all(float(at_2[k].abs().max()) > 0 for k in lora_b)
    for name, value in at_2.items():
        saved = name.replace(".default", "")
        torch.testing.assert_close(kept[saved], value)
    assert any(not torch.equal(at_1[k], at_2[k]) for k in lora_b)
    manifest = json.loads((tmp_path / "run" / "artifact" / "hone.json").read_text())
    assert manifest["metrics"]["guard"]["best_step"] == 2


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_model_dir, tmp_path):
    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir))
    config = _small(max_steps=3, lr=1e-3, save_every=1, keep_checkpoints=5, eval_every=2)
    whole = grpo(task, config, out=tmp_path / "whole")
    # "interrupt" a copy after its step-2 checkpoint: drop everything after it, then resume
    import shutil

    part = tmp_path / "part"
    shutil.copytree(tmp_path / "whole", part)
    shutil.rmtree(part / "artifact")
    lines = [r for r in read_metrics(part / "metrics.jsonl") if r.get("step", 0) <= 2 and r.get("event") != "done"]
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    resumed = grpo(task, config, out=part, resume=True)
    a = load_file(tmp_path / "whole" / "artifact" / "adapter" / "adapter_model.safetensors")
    b = load_file(part / "artifact" / "adapter" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name])
    assert resumed.manifest.metrics["final_step"] == whole.manifest.metrics["final_step"] == 3


VARIED = ("def varied(prompts, completions, completion_ids, **kw):\n"
          "    return [0.1 * (sum(ids) % 11) for ids in completion_ids]\n")
# What the UI's curves read (honellm/ui/static/app.js): GUARD_KEYS on `kind: guard` lines, and the reward.
UI_GUARD_KEYS = ("proxy", "gold", "kl", "mean_length", "distinct_n", "entropy")


def test_ppo_trains_its_value_head_and_adapter_and_logs_the_curves(tiny_model_dir, tmp_path):
    """PPO, beyond its files: with rewards that vary, the value head (zero at the start) and the adapter (B zero
    at the start) both move, every loss is finite, and the reward and guard curves are logged with the fields the
    UI draws."""
    from honellm.reward.recipes.ppo import PPOConfig, ppo

    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir, reward_code=VARIED,
                                           rewards=[{"python": "rewards.py:varied"}]))
    config = PPOConfig(max_steps=2, prompts_per_step=4, max_new_tokens=6, ppo_epochs=2, eval_every=1,
                       guard_prompts=4, r=4, precision="fp32", lr=1e-3)
    artifact = ppo(task, config, out=tmp_path / "run")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["updates"] == 2 for r in train)
    for r in train:
        for key in ("loss", "policy_loss", "value_loss", "approx_kl", "grad_norm", "reward", "reward_std"):
            assert math.isfinite(r[key]), (key, r)
        assert r["reward_std"] > 0 and r["value_loss"] > 0 and r["grad_norm"] > 0
        assert r["rewards/varied"] == pytest.approx(r["reward"])
    guard = [r for r in rows if r.get("kind") == "guard"]
    assert [r["step"] for r in guard] == [0, 1, 2]
    paths = next(r for r in rows if r.get("event") == "model_paths")  # the policy's paths, not the wrapper's
    assert paths["model_type"] == "llama" and paths["training"] and paths["decoding"], paths
    assert all(isinstance(r[k], (int, float)) and math.isfinite(r[k]) for r in guard for k in UI_GUARD_KEYS)
    head = load_file(tmp_path / "run" / "artifact" / "value_head.safetensors")
    assert set(head) == {"weight", "bias"} and all(torch.isfinite(v).all() for v in head.values())
    assert head["weight"].abs().sum() > 0  # trained away from its zero initialisation
    adapter = load_file(tmp_path / "run" / "artifact" / "adapter" / "adapter_model.safetensors")
    b_matrices = [v for k, v in adapter.items() if "lora_B" in k]
    assert b_matrices and any(v.abs().sum() > 0 for v in b_matrices)  # PEFT starts every B at zero
    assert artifact.kind == "adapter" and artifact.manifest.method == "ppo"


def test_grpo_packing_true_takes_the_padded_runs_first_step_and_ppo_refuses_it(tiny_model_dir, tmp_path):
    from honellm.errors import HoneError
    from honellm.reward.recipes.ppo import PPOConfig, ppo

    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir, reward_code=VARIED,
                                           rewards=[{"python": "rewards.py:varied"}]))
    found = {}
    for packing in (False, True):
        grpo(task, _small(max_steps=1, eval_every=0, lr=1e-3, kl_coef=0.1, dynamic_sampling=False,
                          packing=packing), out=tmp_path / f"run-{packing}")
        rows = read_metrics(tmp_path / f"run-{packing}" / "metrics.jsonl")
        start = next(r for r in rows if r.get("event") == "start")
        assert start["packing"] is packing and start["unpacked_because"] is None
        done = next(r for r in rows if r.get("event") == "done")  # how rollouts decoded: the lean runner (CPU)
        assert start["decoding"] == done["decoding"] == "decoder"
        (train,) = [r for r in rows if r.get("kind") == "train"]
        found[packing] = [train[k] for k in ("loss", "grad_norm", "reward", "completion_length", "entropy")]
    assert found[False][1] > 0 and found[True] == pytest.approx(found[False], rel=1e-5, abs=1e-7)
    with pytest.raises(HoneError, match="value head"):
        ppo(task, PPOConfig(max_steps=1, prompts_per_step=2, max_new_tokens=4, guard_prompts=4, r=4,
                            precision="fp32", packing=True), out=tmp_path / "ppo")


def test_grpo_rollouts_decoded_through_replayed_steps_train_as_eager_ones(tiny_model_dir, tmp_path, monkeypatch):
    """GRPO's rollouts with the GPU's decoding (a CPU standing in): the LoRA policy merged into derived weights and
    given back after each rollout phase, each batch's step recorded and replayed (`DecodeGraph`, the recording an
    eager re-run here): the same rewards, losses and gradient norms as eager decoding, step by step."""
    from honellm.core import runners
    from honellm.generation import engine

    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir, reward_code=VARIED,
                                           rewards=[{"python": "rewards.py:varied"}]))
    settings = dict(max_steps=2, eval_every=0, lr=1e-3, kl_coef=0.1, dynamic_sampling=False, max_new_tokens=18)
    grpo(task, _small(**settings), out=tmp_path / "eager")
    recordings = []

    def record(run):  # an eager re-run writing into one buffer
        recordings.append(1)
        out = run().clone()
        return out, lambda: out.copy_(run())

    monkeypatch.setattr(engine, "decode_graphs", lambda runner, device: isinstance(runner, runners.DecoderRunner))
    monkeypatch.setattr(runners.DecodeGraph, "record", staticmethod(record))
    monkeypatch.setattr(runners, "_on_gpu", lambda device: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**12, 10**12))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    grpo(task, _small(**settings), out=tmp_path / "graphed")
    found = {}
    for name in ("eager", "graphed"):
        rows = read_metrics(tmp_path / name / "metrics.jsonl")
        found[name] = [r[k] for r in rows if r.get("kind") == "train"
                       for k in ("reward", "loss", "grad_norm", "completion_length")]
        decoding = next(r for r in rows if r.get("event") == "done")["decoding"]
        assert decoding == ("decoder" if name == "eager" else "decoder, CUDA graphs")
    assert recordings  # the rollouts took the replayed steps
    assert found["eager"][0] != 0 and found["graphed"] == pytest.approx(found["eager"], rel=1e-5, abs=1e-7)
