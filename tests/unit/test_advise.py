"""`hone advise`: the playbook's order of methods from the task's data, the budget and a probe (tiny model)."""

from __future__ import annotations

from honellm.compare.advise import advise
from honellm.task import Task
from honellm.testing import make_tiny_preference_task, make_tiny_reward_task, make_tiny_task


def methods(advice):
    return [s.method for s in advice.steps]


def test_a_label_task_prompts_first_then_tunes_then_rl_on_its_checkable_answers(tiny_model_dir, tmp_path):
    advice = advise(Task.load(make_tiny_task(tmp_path / "t", tiny_model_dir, n_train=80)))
    assert methods(advice) == ["zero-shot", "few-shot", "prompt-search", "lora", "dora", "ia3", "grpo"]
    assert advice.facts["metric_reward"] == "choice_correct"
    grpo = advice.steps[-1]
    assert "after tuning" in grpo.why and grpo.est_train_seconds > 0
    assert dict(advice.not_applicable)["dpo"].startswith("no preference pairs")
    assert all(s.est_memory_gb > 0 for s in advice.steps)
    assert advice.steps[1].est_prompt_tokens > advice.steps[0].est_prompt_tokens  # demonstrations cost tokens


def test_few_examples_do_not_get_tuning(tiny_model_dir, tmp_path):
    advice = advise(Task.load(make_tiny_task(tmp_path / "t", tiny_model_dir, n_train=20)))
    assert "lora" not in methods(advice) and "only 20 training examples" in dict(advice.not_applicable)["lora"]


def test_preference_pairs_get_the_dpo_family(tiny_model_dir, tmp_path):
    advice = advise(Task.load(make_tiny_preference_task(tmp_path / "p", tiny_model_dir, n_train=64)))
    assert "dpo" in methods(advice) and "simpo" in methods(advice) and "few-shot" not in methods(advice)
    assert methods(advice)[0] == "zero-shot"
    # every step names a registered method (what `hone align --method` takes) with the registry's family
    from honellm.methods.catalog import get_method

    assert "reward_model" in methods(advice)
    for step in advice.steps:
        assert step.family == get_method(step.method).family


def test_reward_functions_get_online_rl_and_a_budget_moves_slow_methods_last(tiny_model_dir, tmp_path):
    task = Task.load(make_tiny_reward_task(tmp_path / "r", tiny_model_dir, n_train=64))
    advice = advise(task)
    grpo = next(s for s in advice.steps if s.method == "grpo")
    assert "reward functions can check answers" in grpo.why and "gold_rewards" in grpo.why
    tight = advise(task, budget_seconds=grpo.est_train_seconds / 2)
    assert methods(tight)[-1] == "grpo" and "over the" in tight.steps[-1].note


def test_the_probe_measures_the_zero_shot_score(tiny_model_dir, tmp_path):
    advice = advise(Task.load(make_tiny_task(tmp_path / "t", tiny_model_dir, n_train=80)), probe=True)
    probe = advice.probe
    assert probe["split"] == "validation" and 0.0 <= probe["zero_shot_score"] <= 1.0
    assert probe["ci95"][0] <= probe["zero_shot_score"] <= probe["ci95"][1] and probe["metric"] == "accuracy"


def test_the_matmul_speed_is_measured_once_per_process():
    from honellm.compare.advise import measure_matmul_flops

    first = measure_matmul_flops(0.05)
    first["auto"] = 0.0  # a caller's copy; the kept figures stay
    second = measure_matmul_flops(0.05)
    assert second["auto"] > 0 and second == measure_matmul_flops(0.05) and set(second) == {"auto", "fp32"}


SMALL = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
         "num_key_value_heads": 3, "vocab_size": 49152}  # SmolLM2-135M
LARGE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
         "num_key_value_heads": 32, "vocab_size": 49152}  # SmolLM2-1.7B


def _transformers_parameters(config: dict) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=True))
    return sum(p.numel() for p in model.parameters())


def test_costs_follow_the_model_shape_and_the_data_lengths():
    from honellm.compare.advise import CostModel, lora_tokens_per_second
    from honellm.training.memory import GiB, ModelShape, estimate_for_shape

    small, large = ModelShape.of(SMALL), ModelShape.of(LARGE)
    # exactly transformers' count of the same LLaMA shapes (built on the meta device) less the RMSNorm weights,
    # which `parameters()` leaves out: two per layer and the final one
    for shape, config in ((small, SMALL), (large, LARGE)):
        assert shape.parameters() == _transformers_parameters(config) - (2 * shape.layers + 1) * shape.hidden

    def costs(shape, prompt=60, answer=2):
        return CostModel(shape, shape.parameters(), True, prompt, answer)

    lora = costs(small).memory_gb("lora")
    expected = estimate_for_shape(small, stored_bytes=small.parameters() * 2 + small.lora_parameters() * 4,
                                  trainable=small.lora_parameters(), micro_batch_size=8, seq_len=62,
                                  loss_tokens=16, attention="eager").total / GiB
    assert lora == expected  # the pre-flight's own estimate
    assert costs(large).memory_gb("lora") > 3 * lora
    assert costs(small, prompt=600).memory_gb("lora") > lora  # longer data, more activations
    assert costs(small).memory_gb("full") > lora and costs(small).memory_gb("inference") < lora
    pairs = costs(small, answer=200)
    assert pairs.memory_gb("lora", sequences_per_example=2) > pairs.memory_gb("lora")
    # tokens/s: the measured sizes' speeds at their measured matmul speed (bench/README.md), slower for larger models
    # (bench_sizes.py, quiet: SmolLM2-1.7B 122 tokens/s at 1.20 TFLOP/s, SmolLM2-135M 1011 at 1.37)
    assert abs(lora_tokens_per_second(large, 1.2e12) - 122) < 12
    assert abs(lora_tokens_per_second(small, 1.37e12) - 1011) < 100
    assert lora_tokens_per_second(large, 1e12) < lora_tokens_per_second(small, 1e12) / 2


def test_the_best_bet_follows_what_compare_measured_on_each_kind_of_task(tiny_model_dir, tmp_path):
    """R9 (docs/playbook.md): labels in the hundreds -> LoRA; too few -> the prompt search; pairs -> DPO; bare
    checkable answers -> GRPO; a tool task without demonstrations -> GRPO with the cold-start warning."""
    def bet(path):
        return advise(Task.load(path)).best_bet

    assert bet(make_tiny_task(tmp_path / "t", tiny_model_dir, n_train=80))["method"] == "lora"
    assert bet(make_tiny_task(tmp_path / "few", tiny_model_dir, n_train=20))["method"] == "prompt-search"
    assert bet(make_tiny_preference_task(tmp_path / "p", tiny_model_dir, n_train=64))["method"] == "dpo"
    reward = make_tiny_reward_task(tmp_path / "r", tiny_model_dir, n_train=64)
    found = bet(reward)
    assert found["method"] == "grpo" and found["rules"] == ["R9", "R6"] and "bare final answers" in found["why"]
    reward.write_text(reward.read_text() + "tools:\n  - {name: calculator}\n")
    tools = bet(reward)
    assert tools["method"] == "grpo" and "cold start" in tools["why"]
