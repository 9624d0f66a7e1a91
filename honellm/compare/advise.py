"""`hone advise TASK`: the playbook (docs/playbook.md) applied to a task's data, the hardware and the budget.

It recommends the order of methods to try, why (the playbook's rule ids), and the estimated cost of each:
training time from the task's token count and this machine's measured bf16/fp32 matmul speed, memory from the
parameter count, and prompt tokens per request at inference.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field

from honellm.methods.catalog import get_method
from honellm.task import Task

# Training FLOPs per token: forward 2N, backward 4N for full fine-tuning (Kaplan et al. 2020); with frozen weights
# (LoRA and friends) the backward skips weight gradients, about 2N, so ~4N in all.
FLOPS_PER_TOKEN = {"full": 6, "peft": 4, "inference": 2}
# Share of the measured matmul peak a training loop reaches on small models (attention, norms, optimizer, Python).
EFFICIENCY = 0.35
# LoRA SFT: the share of the measured 1024-square matmul speed a step reaches per decoder FLOP (see
# `lora_tokens_per_second`), by the decoder's parameter count: small models spend most of a step outside the large
# products, large ones run GEMMs bigger than the 1024-square one measured. Fitted to bench/bench_sizes.py on a quiet
# 2-core AMX CPU (the SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B and SmolLM2-1.7B shapes; bench/README.md has the
# table); the 1.7B shape's full-width key/value heads make its attention costlier than the 1B shape's GQA.
PEFT_EFFICIENCY = ((106e6, 0.31), (358e6, 0.47), (973e6, 0.79), (1.61e9, 0.66))


@dataclass
class Step:
    method: str
    family: str
    rules: list[str]
    why: str
    est_train_seconds: float | None = None
    est_memory_gb: float | None = None
    est_prompt_tokens: float | None = None
    note: str | None = None


@dataclass
class Advice:
    task: str
    facts: dict
    steps: list[Step] = field(default_factory=list)
    not_applicable: list[tuple[str, str]] = field(default_factory=list)
    probe: dict | None = None
    best_bet: dict | None = None  # the method the rules expect to win (R9), beside the order to try them in

    def to_dict(self) -> dict:
        return asdict(self)


def measure_matmul_flops(seconds: float = 0.5) -> dict[str, float]:
    """Achieved matmul FLOP/s on this machine in bf16 (where fast) and fp32, from square 1024 products.

    Measured once per process and kept: a shared or throttled machine's speed moves by 2x and more within a minute,
    and advice given twice in one process (a budget tried after the defaults) must rest on the same figures.
    """
    return dict(_measured_matmul_flops(seconds))


@functools.cache
def _measured_matmul_flops(seconds: float) -> dict[str, float]:
    import torch

    from honellm.hardware import default_device, pick_dtype

    device = default_device()
    out = {}
    for name, dtype in (("auto", pick_dtype("auto", device)), ("fp32", torch.float32)):
        a = torch.randn(1024, 1024, dtype=dtype, device=device)
        b = torch.randn(1024, 1024, dtype=dtype, device=device)
        a @ b
        # The fastest single product, not the mean: a product (a millisecond or two) is shorter than a scheduler's
        # time slice, so on a machine busy with other work some run whole and show what the hardware does; a
        # mean over the half second showed the load instead (estimates 30x too slow next to a training run).
        fastest, start = math.inf, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            began = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            fastest = min(fastest, time.perf_counter() - began)
        out[name] = 2 * 1024**3 / fastest
    return out


def data_facts(task: Task, tokenizer=None, sample: int = 200) -> dict:
    """What the data holds and how long it is."""
    facts: dict = {"format": task.format, "kind": task.kind, "metric": task.metric, "splits": {}}
    for split in task.available_splits():
        facts["splits"][split] = len(task.split(split))
    facts["n_train"] = facts["splits"].get("train", 0)
    facts["has_targets"] = task.kind in ("sft", "reference")
    facts["has_choices"] = bool(task.config.choices)
    facts["has_pairs"] = task.kind == "preference"
    facts["has_unpaired"] = task.kind == "unpaired"
    facts["has_rewards"] = bool(task.config.rewards)
    facts["has_gold_rewards"] = bool(task.config.gold_rewards)
    from honellm.reward.rollout import metric_reward

    # Without `rewards:`, online RL can still train on the task's metric when it checks generated answers.
    facts["metric_reward"] = None if facts["has_rewards"] else (
        ("choice_correct" if task.config.choices else task.metric) if metric_reward(task) is not None else None)
    if tokenizer is not None and facts["n_train"]:
        from honellm.data.chat import build_messages, render_answer, render_prompt

        records = task.split("train")[:sample]
        prompt_tokens, answer_tokens = [], []
        for record in records:
            if task.kind == "preference":
                pair = task.pair(record)
                messages, answer = build_messages(task.config.prompt.system, [], pair.prompt), pair.chosen
            else:
                messages = build_messages(task.config.prompt.system, [], task.messages(record))
                answer = task.target(record) or ""
            prompt_tokens.append(len(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False).input_ids))
            answer_tokens.append(len(tokenizer(render_answer(tokenizer, messages, answer), add_special_tokens=False).input_ids))
        facts["mean_prompt_tokens"] = sum(prompt_tokens) / len(prompt_tokens)
        facts["mean_answer_tokens"] = sum(answer_tokens) / len(answer_tokens)
        facts["max_prompt_tokens"] = max(prompt_tokens)
        facts["max_answer_tokens"] = max(answer_tokens)
    return facts


def _train_seconds(tokens: float, params: float, flops: float, kind: str, shape=None) -> float:
    if kind == "peft" and shape is not None:
        return tokens / lora_tokens_per_second(shape, flops)
    return tokens * FLOPS_PER_TOKEN[kind] * params / max(flops * EFFICIENCY, 1.0)


def lora_tokens_per_second(shape, flops: float) -> float:
    """LoRA SFT training tokens/s of a model of `shape` (a `ModelShape`) on a machine whose measured bf16 matmul
    speed is `flops` (`measure_matmul_flops`): 4 x the decoder's parameters per token (the forward, and the
    backward's input gradients; frozen weights get none; the LM head runs at answer positions only, so the
    embedding does not count), at the `PEFT_EFFICIENCY` share of the measured speed for its size."""
    import math

    body = max(shape.parameters() - shape.vocab * shape.hidden * (1 if shape.tied else 2), 1)
    points = PEFT_EFFICIENCY
    if body <= points[0][0]:
        efficiency = points[0][1]
    elif body >= points[-1][0]:
        efficiency = points[-1][1]
    else:  # linear in log(parameters) between the measured sizes
        (n0, e0), (n1, e1) = next((a, b) for a, b in zip(points, points[1:], strict=False) if body <= b[0])
        efficiency = e0 + (e1 - e0) * math.log(body / n0) / math.log(n1 / n0)
    return flops * efficiency / (FLOPS_PER_TOKEN["peft"] * body)


@dataclass
class CostModel:
    """The memory a run of each kind will take, from the model's shape and the data's lengths: the training
    pre-flight's own estimate (`honellm.training.memory`, calibrated on real shapes by bench/bench_sizes.py) for
    the micro-batch the recipe's defaults will train on (8 examples of the longest sampled length; DPO and the
    reward model: 8 pairs, 16 sequences; the pre-flight takes smaller micro-batches where that does not fit)."""

    shape: object  # ModelShape
    params: int
    low_precision: bool  # frozen weights in bf16
    prompt_tokens: int  # the longest sampled prompt
    answer_tokens: int  # the longest sampled answer
    device_type: str = "cpu"
    batch: int = 8
    max_length: int = 1024

    def memory_gb(self, kind: str, *, sequences_per_example: int = 1, answer_tokens: int | None = None,
                  evaluation: bool = False, logits: bool = True) -> float:
        """Peak GiB of training `kind` ("lora", "dora", "ia3", "full", "inference")."""
        import torch

        from honellm.training.memory import CPU_OVERHEAD, GPU_OVERHEAD, GiB, estimate_for_shape

        width = 2 if self.low_precision else 4
        answer = self.answer_tokens if answer_tokens is None else answer_tokens
        length = min(self.prompt_tokens + answer, self.max_length)
        if kind == "inference":
            overhead = GPU_OVERHEAD if self.device_type == "cuda" else CPU_OVERHEAD
            # weights, the runtime, and one evaluation batch's full-vocabulary logits at the last position
            return (self.params * width + overhead + 16 * self.shape.vocab * 4 * 2) / GiB
        if kind == "full":
            trainable, stored = self.params, self.params * 4
        else:
            trainable = {"lora": self.shape.lora_parameters(16), "dora": self.shape.lora_parameters(16),
                         "ia3": self.shape.layers * (2 * self.shape.attention_dims[1] + self.shape.intermediate)}[kind]
            stored = self.params * width + trainable * 4
        sequences = self.batch * sequences_per_example
        estimate = estimate_for_shape(
            self.shape, stored_bytes=stored, trainable=trainable, micro_batch_size=sequences, seq_len=length,
            loss_tokens=sequences * min(answer, length) if logits else 0,
            compute_dtype=torch.bfloat16 if self.low_precision else torch.float32, device_type=self.device_type,
            attention="eager" if self.device_type == "cpu" and length <= 256 else "sdpa",
            evaluation_batch=16 if evaluation else 0)
        return estimate.total / GiB


def advise(task: Task, *, budget_seconds: float | None = None, max_latency_ms: float | None = None,
           memory_gb: float | None = None, probe: bool = False, epochs: int = 2, shots: int = 4) -> Advice:
    """Apply the playbook. `probe` also measures the zero-shot score (and how fast this machine trains)."""
    from honellm import hardware
    from honellm.models import load_tokenizer, resolve

    tokenizer = load_tokenizer(task.config.model)
    facts = data_facts(task, tokenizer)
    hw = hardware.describe()
    facts["hardware"] = hw
    flops = measure_matmul_flops()
    facts["matmul_tflops"] = {k: round(v / 1e12, 2) for k, v in flops.items()}
    params = _parameter_count(resolve(task.config.model).path)
    facts["model_parameters"] = params
    memory_gb = memory_gb or hw.get("gpu_memory_gb") or hw.get("memory_gb") or 8.0
    facts["memory_gb"] = memory_gb
    advice = Advice(task.name, facts)

    n = facts["n_train"]
    prompt_len = facts.get("mean_prompt_tokens", 64.0)
    answer_len = facts.get("mean_answer_tokens", 16.0)
    example_len = prompt_len + answer_len
    train_tokens = n * example_len * epochs
    peak = flops["auto"]
    costs = _cost_model(task, params, facts, hw)
    inference_memory = costs.memory_gb("inference")
    validating = "validation" in facts["splits"]
    full_memory = costs.memory_gb("full", evaluation=validating)

    if probe:
        advice.probe = _probe(task)

    def add(method, rules, why, **kw):
        """A step of the playbook for a registered method: its family from the registry, and, where the task lacks
        the data the method declares it needs, a line of why not instead."""
        spec = get_method(method)
        missing = spec.missing(task)
        if missing is not None:
            advice.not_applicable.append((method, f"{missing[0]}; {missing[1]}"))
            return
        advice.steps.append(Step(method, spec.family, rules, why, **kw))

    # R1 / R2: prompting first.
    add("zero-shot", ["R1"], "no training; the baseline every other method must beat",
        est_train_seconds=0.0, est_memory_gb=round(inference_memory, 2), est_prompt_tokens=round(prompt_len, 1))
    if n and facts["has_targets"]:
        few_tokens = prompt_len + shots * (example_len - 10)
        note = None
        if max_latency_ms is not None:
            note = f"{few_tokens:.0f} prompt tokens per request; check against the {max_latency_ms:.0f} ms budget (R4)"
        add("few-shot", ["R1", "R2"],
            f"{shots} demonstrations chosen by similarity (BM25) from {n} training examples"
            + ("; contextual calibration for the label choices" if facts["has_choices"] else ""),
            est_train_seconds=0.0, est_memory_gb=round(inference_memory, 2), est_prompt_tokens=round(few_tokens, 1), note=note)
        if "validation" in facts["splits"]:
            add("prompt-search", ["R2"],
                "search instructions, shots, selector and calibration on the validation split",
                est_train_seconds=round(12 * facts["splits"]["validation"] * prompt_len * 2 * params / (peak * EFFICIENCY), 1),
                est_memory_gb=round(inference_memory, 2), est_prompt_tokens=round(few_tokens, 1))
    else:
        advice.not_applicable.append(("few-shot", "no training examples with answers to use as demonstrations"))

    # R3 / R8: tuning.
    tunable = facts["has_targets"] or facts["has_pairs"]
    if tunable and n >= 50:
        rules, why = ["R3"], f"{n} training examples: enough for parameter-efficient tuning"
        if n < 200:
            why += " (few: keep epochs low, watch validation)"
        add("lora", rules + (["R4"] if max_latency_ms else []), why,
            est_train_seconds=round(_train_seconds(train_tokens, params, peak, "peft", costs.shape), 1),
            est_memory_gb=round(costs.memory_gb("lora", evaluation=validating), 2),
            est_prompt_tokens=round(prompt_len, 1))
        add("dora", ["R3"], "LoRA with weight decomposition: often a little better at the same rank, slower per step",
            est_train_seconds=round(1.4 * _train_seconds(train_tokens, params, peak, "peft", costs.shape), 1),
            est_memory_gb=round(costs.memory_gb("dora", evaluation=validating), 2),
            est_prompt_tokens=round(prompt_len, 1))
        add("ia3", ["R3"], "the fewest trainable parameters; strong with little data",
            est_train_seconds=round(0.9 * _train_seconds(train_tokens, params, peak, "peft", costs.shape), 1),
            est_memory_gb=round(costs.memory_gb("ia3", evaluation=validating), 2),
            est_prompt_tokens=round(prompt_len, 1))
        if full_memory <= memory_gb * 0.8 and n >= 1000:
            add("full", ["R3", "R8"], f"full fine-tuning fits in memory ({full_memory:.1f} GB of {memory_gb:.0f})",
                est_train_seconds=round(_train_seconds(train_tokens, params, peak, "full"), 1),
                est_memory_gb=round(full_memory, 2), est_prompt_tokens=round(prompt_len, 1))
        elif n >= 1000:
            advice.not_applicable.append(("full", f"full fine-tuning needs ~{full_memory:.1f} GB; {memory_gb:.0f} GB here (R8)"))
    elif tunable:
        advice.not_applicable.append(("lora", f"only {n} training examples: prompting first, tuning overfits below ~50 (R3)"))
    else:
        advice.not_applicable.append(("lora", "no answers to learn from (the data has no targets)"))

    # R5 / R7: preference data.
    if facts["has_pairs"]:
        pair_tokens = n * (prompt_len + 2 * answer_len) * epochs
        add("dpo", ["R5"], f"{n} preference pairs: optimise the preference directly, no reward model",
            est_train_seconds=round(1.5 * _train_seconds(pair_tokens, params, peak, "peft", costs.shape), 1),
            est_memory_gb=round(costs.memory_gb("lora", sequences_per_example=2), 2),
            est_prompt_tokens=round(prompt_len, 1))
        add("simpo", ["R5", "R8"], "reference-free: no reference pass, less memory and time",
            est_train_seconds=round(_train_seconds(pair_tokens, params, peak, "peft", costs.shape), 1),
            est_memory_gb=round(costs.memory_gb("lora", sequences_per_example=2), 2),
            est_prompt_tokens=round(prompt_len, 1))
        add("reward_model", ["R7"], "a reward model for RLHF (PPO/GRPO) and best-of-n at inference",
            est_train_seconds=round(_train_seconds(pair_tokens, params, peak, "peft", costs.shape), 1),
            est_memory_gb=round(costs.memory_gb("lora", sequences_per_example=2, logits=False), 2))
    elif facts["has_unpaired"]:
        add("kto", ["R5"], "thumbs-up/down labels without pairs: KTO",
            est_train_seconds=round(1.5 * _train_seconds(train_tokens, params, peak, "peft", costs.shape), 1),
            est_memory_gb=round(costs.memory_gb("lora"), 2), est_prompt_tokens=round(prompt_len, 1))
    else:
        advice.not_applicable.append(("dpo", "no preference pairs in the data (R5)"))

    # R6: verifiable rewards.
    if (facts["has_rewards"] or facts.get("metric_reward")) and n:
        group, steps = 8, 100
        rollout_tokens = steps * 4 * group * (prompt_len + 64)
        if facts["has_rewards"]:
            why = "reward functions can check answers: online RL with verifiable rewards"
        else:
            why = (f"the answers can be checked ({facts['metric_reward']} on the reference is the reward), but labelled "
                   "answers also train directly: try RL after tuning")
        if not facts["has_gold_rewards"] and facts["has_rewards"]:
            why += "; add gold_rewards so the reward-hacking guard has a signal the policy is not trained on"
        note = None
        if advice.probe and advice.probe.get("zero_shot_score") == 0.0:
            note = "the zero-shot score is 0: groups of samples that all score 0 teach nothing; tune or prompt first (R6)"
        add("grpo", ["R6"], why,
            est_train_seconds=round(_train_seconds(rollout_tokens, params, peak, "inference") * 4, 1),
            est_memory_gb=round(costs.memory_gb("lora", answer_tokens=64), 2), est_prompt_tokens=round(prompt_len, 1),
            note=note)
    else:
        advice.not_applicable.append(("grpo", "no reward functions in the task and no checkable answers (R6)"))

    # Budget and latency: methods over budget go last, with a note.
    if budget_seconds is not None:
        within = [s for s in advice.steps if (s.est_train_seconds or 0) <= budget_seconds]
        over = [s for s in advice.steps if (s.est_train_seconds or 0) > budget_seconds]
        for s in over:
            s.note = (s.note + "; " if s.note else "") + f"estimated {s.est_train_seconds:.0f} s is over the {budget_seconds:.0f} s budget"
        advice.steps = within + over
    if max_latency_ms is not None:
        # R4: with a latency budget, an adapter (no extra prompt tokens) goes before long few-shot prompts.
        advice.steps.sort(key=lambda s: (s.family == "prompting" and (s.est_prompt_tokens or 0) > 2 * prompt_len))
    advice.best_bet = best_bet(task, facts, [s.method for s in advice.steps])
    return advice


# A reference this short is a bare final answer (a number, a word): nothing of the working that produced it.
BARE_ANSWER_TOKENS = 8


def best_bet(task: Task, facts: dict, methods: list[str]) -> dict | None:
    """R9: the method the playbook expects to score best on this task (the order of `steps` is the order to try
    them in, cheapest first, which is another question). Checked against `hone compare` on every example and
    built-in task (docs/playbook.md, "Checked against measurement")."""

    def bet(method: str, rules: list[str], why: str) -> dict | None:
        return {"method": method, "rules": rules, "why": why} if method in methods else None

    n = facts["n_train"]
    if task.config.tools and facts["has_rewards"]:
        if task.format == "chat" and facts["has_targets"]:
            return bet("lora", ["R9", "R6"], "the records demonstrate whole tool episodes: fine-tune on them (the cold "
                                            "start), then GRPO from the merged model to sharpen the calls")
        return bet("grpo", ["R9", "R6"], "verifiable rewards over tool episodes; but GRPO cannot reinforce a tool call "
                                        "the model never samples: a cold start on demonstrations of whole episodes "
                                        "first is what makes it use the tool")
    if facts["has_pairs"]:
        return bet("dpo", ["R9", "R5"], f"{n} preference pairs: the offline preference family learns the judgement "
                                       "directly")
    if facts["has_targets"] and facts["has_rewards"] and not facts["has_choices"] \
            and facts.get("mean_answer_tokens", 0) <= BARE_ANSWER_TOKENS:
        return bet("grpo", ["R9", "R6"], "the references are bare final answers: fine-tuning on them teaches the "
                                        "model to guess the answer without the working; RL with the checkable "
                                        "reward keeps the working that gets answers right")
    if facts["has_targets"] and n >= 50:
        return bet("lora", ["R9", "R3"], f"{n} labelled examples: tuning learns the task, prompting only shows it")
    if facts["has_targets"]:
        return bet("prompt-search", ["R9", "R2"], f"only {n} labelled examples: too few to tune without overfitting")
    return bet("zero-shot", ["R9", "R1"], "nothing to learn from in the data")


def _cost_model(task: Task, params: int, facts: dict, hw: dict) -> CostModel:
    """The model's shape (its config.json; a LLaMA-like guess from the parameter count without one) and the data's
    lengths, for `CostModel`."""
    import json

    from honellm.models import resolve
    from honellm.training.memory import ModelShape

    path = resolve(task.config.model).path
    try:
        shape = ModelShape.of(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError):
        hidden = max(256, int(round((params / 80) ** 0.5 / 64)) * 64)  # ~ layers x 12 h^2 with layers ~ h / 85
        shape = ModelShape(layers=max(1, int(params / (12 * hidden * hidden))), hidden=hidden,
                           intermediate=4 * hidden, heads=max(1, hidden // 64), vocab=32000)
    return CostModel(shape, params or shape.parameters(), bool(hw.get("cpu_bf16") or hw.get("gpu")),
                     int(facts.get("max_prompt_tokens", 64)), int(facts.get("max_answer_tokens", 16)),
                     device_type="cuda" if hw.get("gpu") else "cpu")


def _parameter_count(path) -> int:
    from honellm.models import _count_safetensors

    return _count_safetensors(path) or 0


def _probe(task: Task, limit: int = 50) -> dict:
    """A quick zero-shot score on part of the validation split (or train when there is none)."""
    from honellm.artifact import Artifact
    from honellm.evaluation.evaluate import evaluate

    split = "validation" if task.has_split("validation") else "train"
    start = time.perf_counter()
    result = evaluate(Artifact.zero_shot(task.config.model, task), task, split=split, limit=limit, progress=False)
    return {"split": split, "limit": limit, "zero_shot_score": result.score, "metric": result.metric,
            "ci95": list(result.ci95), "seconds": round(time.perf_counter() - start, 1)}
