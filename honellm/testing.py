"""A tiny random chat model for fast tests: 2 layers, a few hundred tokens of vocabulary.

`make_tiny_model(path)` writes a standard Hugging Face folder (Llama architecture, a byte-level BPE tokenizer
trained here on a fixed corpus, SmolLM2's ChatML chat template) that every code path of Hone can load like a
real model, in well under a second. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The names Debian and others give headless-capable Chromium (the browser tests and the screenshot scripts).
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """The path of a Chromium binary on PATH, or None."""
    import shutil

    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


_CORPUS = [
    "Review: a gripping, funny and warm film. positive",
    "Review: dull, lifeless and far too long. negative",
    "What is 2 + 3? The answer is 5. #### 5",
    "Classify the message: my card was charged twice. billing",
    "Classify the message: the app crashes when I log in. technical",
    "Human: how do I bake bread? Assistant: Mix flour, water, yeast and salt.",
    "The quick brown fox jumps over the lazy dog. 0123456789 {\"a\": 1}",
    "You are a helpful assistant. Answer with one word: yes or no.",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def make_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (so any text encodes) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_model(path: str | Path, *, seed: int = 0, layers: int = 2, hidden: int = 64, vocab_size: int = 384):
    """Write a tiny random Llama chat model to `path` and return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = make_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return _save_model(model, tok, path)


def _save_model(model, tok, path: Path) -> Path:
    """Write `model` and `tok` as a standard Hugging Face folder (generation ids from the tokenizer); return it."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_task(folder: str | Path, model_dir: str | Path, *, n_train: int = 48, n_validation: int = 16,
                   seed: int = 0) -> Path:
    """Write a small sentiment task (train/validation JSONL + task YAML) over the tiny model; return the YAML path.

    The reviews use the tiny tokenizer's corpus words, so they encode in few tokens and the label is learnable.
    """
    import json
    import random

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = {"positive": ["gripping", "funny", "warm", "quick"], "negative": ["dull", "lifeless", "long", "lazy"]}
    for split, n in (("train", n_train), ("validation", n_validation)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for _ in range(n):
                label = rng.choice(["positive", "negative"])
                text = "a " + ", ".join(rng.sample(words[label], rng.randint(1, 3))) + " film"
                handle.write(json.dumps({"text": text, "label": label}) + "\n")
    task = folder / "task.yaml"
    task.write_text(
        "name: tiny-sentiment\n"
        f"model: {Path(model_dir).resolve()}\n"
        "data: {train: train.jsonl, validation: validation.jsonl}\n"
        "prompt: {system: Classify the review., template: 'Review: {text}'}\n"
        "target: label\n"
        "choices: [positive, negative]\n"
        "metric: accuracy\n"
    )
    return task


def make_tiny_preference_task(folder: str | Path, model_dir: str | Path, *, n_train: int = 32, n_validation: int = 16,
                              seed: int = 0) -> Path:
    """Write a small preference task (prompt/chosen/rejected JSONL + task YAML) over the tiny model; return the YAML.

    The chosen answer names the sentiment of the review, the rejected one the opposite: learnable in a few steps.
    """
    import json
    import random

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = {"positive": ["gripping", "funny", "warm", "quick"], "negative": ["dull", "lifeless", "long", "lazy"]}
    for split, n in (("train", n_train), ("validation", n_validation)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for _ in range(n):
                label = rng.choice(["positive", "negative"])
                other = "negative" if label == "positive" else "positive"
                text = "a " + ", ".join(rng.sample(words[label], rng.randint(1, 3))) + " film"
                handle.write(json.dumps({"prompt": f"Review: {text}", "chosen": label, "rejected": other}) + "\n")
    task = folder / "task.yaml"
    task.write_text(
        "name: tiny-prefs\n"
        f"model: {Path(model_dir).resolve()}\n"
        "data: {train: train.jsonl, validation: validation.jsonl}\n"
        "prompt: {system: Classify the review.}\n"
        "metric: preference_accuracy\n"
    )
    return task


def make_tiny_reward_task(folder: str | Path, model_dir: str | Path, *, n_train: int = 32, n_validation: int = 8,
                          rewards: list[dict] | None = None, gold_rewards: list[dict] | None = None,
                          reward_code: str | None = None, max_new_tokens: int = 8, seed: int = 0) -> Path:
    """Write a small arithmetic task with reward functions over the tiny model (for online RL tests).

    Records are `{"question": "What is 2 + 3?", "answer": "5"}`; the reward defaults to numeric_match.
    `reward_code` is written to `rewards.py` beside the task, for `{python: rewards.py:NAME}` specs.
    """
    import json
    import random

    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("validation", n_validation)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for _ in range(n):
                a, b = rng.randint(0, 4), rng.randint(0, 4)
                handle.write(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
    if reward_code is not None:
        (folder / "rewards.py").write_text(reward_code)
    config = {
        "name": "tiny-arithmetic",
        "model": str(Path(model_dir).resolve()),
        "data": {"train": "train.jsonl", "validation": "validation.jsonl"},
        "prompt": {"system": "Answer with a number.", "template": "{question}"},
        "target": "answer",
        "metric": "numeric_match",
        "rewards": rewards if rewards is not None else [{"name": "numeric_match"}],
        "generation": {"max_new_tokens": max_new_tokens},
    }
    if gold_rewards:
        config["gold_rewards"] = gold_rewards
    task = folder / "task.yaml"
    task.write_text(yaml.safe_dump(config, sort_keys=False))
    return task


# Tiny random models of the architectures users bring (the contract matrix of tests/unit/test_architectures.py and
# the model-core tests build them). Each entry is (config class name in transformers, the keyword arguments that
# differ from the shared shape). Sliding windows are shorter than the test prompts, so windowed attention matters.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {}),  # attention biases on q/k/v
    "qwen3": ("Qwen3Config", {"head_dim": 16}),  # q/k norms
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 50.0,
                                "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}),
    "phi3": ("Phi3Config", {"pad_token_id": None}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {"embedding_multiplier": 2.0, "logits_scaling": 4.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.25}),
    "gpt2": ("GPT2Config", {}),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "opt": ("OPTConfig", {}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "decoder_sparse_step": 1}),
}

# A chat template that rejects a system turn (as Gemma's and Mistral's older templates do).
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _arch_config(arch: str, tok, hidden: int, layers: int, overrides: dict | None = None):
    import transformers

    class_name, extra = ARCHITECTURES[arch]
    config_class = getattr(transformers, class_name)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if arch == "gpt2":
        return config_class(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=4, n_positions=1024, **ids)
    if arch == "gpt_neox":
        return config_class(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                            num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=1024,
                            tie_word_embeddings=False, **ids)
    if arch == "opt":
        return config_class(vocab_size=len(tok), hidden_size=hidden, ffn_dim=hidden * 2, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=1024, word_embed_proj_dim=hidden, **ids)
    kwargs = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=arch not in ("phi3", "olmo2"), **ids)
    kwargs.update(extra)
    kwargs.update(overrides or {})
    if kwargs.get("pad_token_id", 0) is None:
        kwargs["pad_token_id"] = tok.pad_token_id
    return config_class(**kwargs)


def make_tiny_arch_model(path: str | Path, arch: str, *, seed: int = 0, layers: int = 2, hidden: int = 64,
                         chat_template: str | None = "chatml", overrides: dict | None = None) -> Path:
    """Write a tiny random model of architecture `arch` (a key of ARCHITECTURES) to `path`; return the path.

    `chat_template`: "chatml" (SmolLM2's), "no-system" (a template that raises on a system turn) or None (a base
    model without a chat template: Hone must fall back to a plain layout). `overrides`: config fields that differ
    from the table's (e.g. a wider `sliding_window`), for the Llama-shaped architectures.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; one of {sorted(ARCHITECTURES)}")
    path = Path(path)
    tok = make_tiny_tokenizer()
    tok.chat_template = {"chatml": CHATML_TEMPLATE, "no-system": NO_SYSTEM_TEMPLATE, None: None}[chat_template]
    config = _arch_config(arch, tok, hidden, layers, overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return _save_model(model, tok, path)
