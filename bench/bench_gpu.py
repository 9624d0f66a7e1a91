"""The prepared GPU benchmark: Hone against TRL on one GPU, same data and settings, in one command.

    python bench/bench_gpu.py                 # one H100/H200: at most ~8 minutes, no network
    python bench/bench_gpu.py --smoke         # tiny shapes, a few steps, on a CPU (what tests/e2e runs)
    python bench/bench_gpu.py --phases sft-lora-135m,grpo-135m --budget 300
    python bench/bench_gpu.py --phases sft-lora-135m --compile   # also Hone with compile=true (torch.compile)
    python bench/bench_gpu.py --phases sft-lora-135m --padded    # also Hone with packing=false (what packing buys)
    python bench/bench_gpu.py --phases sft-lora-135m --cuda-graphs   # also Hone with cuda_graphs=true
    python bench/bench_gpu.py --phases sft-lora-135m --unfused   # also Hone with PEFT's own LoRA layers
    python bench/bench_gpu.py --phases dpo-135m,grpo-135m --cuda-graphs   # the levers apply there too

No weights or data are downloaded: the models are random weights in the real shapes of SmolLM2-135M and
SmolLM2-1.7B (their configs written out below), with the embedded SmolLM2 tokenizer where it is installed (else a
small byte-level one: the LM head keeps its 49,152 rows either way); the data are synthetic review/label records
(SFT), preference pairs (DPO) and the built-in `arithmetic` task (GRPO). Phases, each side in its own subprocess
(a clean CUDA peak):

- `sft-lora-<shape>` / `sft-full-<shape>`: Hone's SFT recipe (`tune`, its defaults on the device: packing and
  Liger's kernels where installed) against TRL's `SFTTrainer` in its best configuration here (bf16, no gradient
  checkpointing, `padding_free` where flash-attention is installed, `use_liger_kernel` where Liger is), the same
  token sequences (Hone's tokenization, given to TRL pre-tokenized with its labels) in the same batches (Hone's
  length-grouped order, which TRL reads sequentially), max length, epochs, learning rate and schedule (warmup
  starts at lr/(warmup+1) in Hone, at 0 in transformers: the curves part by a little during the warmup);
- `dpo-135m`: `bench_dpo.py`'s two sides (the DPO recipe with its defaults on the device, packing where a varlen
  kernel runs; `DPOTrainer` with precomputed reference log-probs) on synthetic pairs, TRL reading them in Hone's
  batches;
- `grpo-135m`: `bench_grpo_trl.py`'s two sides (the GRPO recipe, `GRPOTrainer`), one timed step.

Printed per phase: tokens/s (real tokens; DPO and GRPO: per step), MFU on CUDA (6 x parameters x tokens/s over the
GPU's dense bf16 peak; for LoRA an overstatement of the work done, the usual convention), peak GPU memory, the
ratio Hone / TRL (SFT: tokens/s; DPO and GRPO: steps/s on the same pairs or prompts, since the sides count a step's
tokens differently), the first losses of both sides and their curves' trend. A last JSON line (`BENCH_GPU {...}`) holds everything. A phase
that would start past `--budget` seconds is skipped (and says so). It asserts nothing; the figures are unmeasured
until someone runs it on a GPU (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MARK = "RESULT "  # a side's JSON line (bench_dpo.py's and bench_grpo_trl.py's sides print "BENCH ")

# SmolLM2's published configs (HuggingFaceTB/SmolLM2-135M-Instruct, -1.7B-Instruct), written out.
SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=49152, max_position_embeddings=8192, rope_theta=130000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=384, max_position_embeddings=1024, rope_theta=10000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=True),
}
# bench_launches.py --time: the 135M shape's layers and heads (every operation a step dispatches) with widths and a
# vocabulary so small that each operation computes for microseconds: a step's time is then the host's.
SHAPES["135m-narrow"] = dict(SHAPES["135m"], hidden_size=36, intermediate_size=48, vocab_size=384)
# phase: (kind, shape, examples, batch size) for the GPU run; --smoke runs each on the tiny shape with a few examples.
PHASES = {
    "sft-lora-135m": ("sft-lora", "135m", 1024, 16),
    "sft-full-135m": ("sft-full", "135m", 1024, 16),
    "sft-lora-1.7b": ("sft-lora", "1.7b", 256, 8),
    "sft-full-1.7b": ("sft-full", "1.7b", 128, 8),
    "dpo-135m": ("dpo", "135m", 0, 8),
    "grpo-135m": ("grpo", "135m", 0, 0),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
SYSTEM = "Classify the sentiment of the movie review as positive or negative. Answer with one word."
WORDS = ("film", "story", "actor", "scene", "plot", "music", "great", "dull", "warm", "funny", "long",
         "slow", "bright", "moving", "cold", "sharp", "gentle", "odd", "quiet", "loud", "brave",
         "tender", "bitter", "clever", "flat", "rich", "thin", "lively")


# ------------------------------------------------------------------------------------------------ inputs


def write_model(shape: str, folder: Path) -> Path:
    """Random weights in `shape` (seed 0) with a chat tokenizer, saved as a model folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    small = SHAPES[shape]["vocab_size"] < 1000  # the byte-level tokenizer's 384 tokens
    tokenizer = _tokenizer(small=small)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = LlamaConfig(**SHAPES[shape], **ids)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.float32 if small else torch.bfloat16)
    model.generation_config = GenerationConfig(**ids)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tokenizer(*, small: bool):
    """The SmolLM2 tokenizer (the real token counts): from `HONE_BENCH_TOKENIZER` (a folder; bench/gpu_kit.py saves
    one into .gpu/tokenizer for a device machine) or the embedded model where it is installed; else a small one."""
    from honellm.testing import CHATML_TEMPLATE, make_tiny_tokenizer

    folder = os.environ.get("HONE_BENCH_TOKENIZER")
    if not small and folder and Path(folder, "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    if not small:
        try:
            from honellm.defaults import DEFAULT_MODEL
            from honellm.models import load_tokenizer

            return load_tokenizer(DEFAULT_MODEL)
        except Exception:  # noqa: BLE001 - not installed here: the small tokenizer serves
            pass
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def sft_records(n: int, seed: int = 0, words: tuple[int, int] = (20, 120)) -> list[dict]:
    """Synthetic review/label records, 20-120 words each (SST-2-like lengths and a little longer)."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))),
             "label": rng.choice(["positive", "negative"])} for _ in range(n)]


def sft_data(model: str, examples: int, max_length: int) -> list[dict]:
    """The SFT records both sides train on: those whose whole conversation fits `max_length` with room to spare
    (neither side truncates: TRL drops an example whose answer would be cut, Hone cuts its prompt)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    kept = []
    for record in sft_records(examples * 20):
        conversation = messages(record) + [{"role": "assistant", "content": record["label"]}]
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        if len(ids) <= max_length - 8:
            kept.append(record)
        if len(kept) == examples:
            return kept
    raise SystemExit(f"only {len(kept)} of {examples * 20} synthetic records fit max_length {max_length}")


def dpo_pairs(n: int, folder: Path, seed: int = 0, small: bool = False) -> Path:
    rng = random.Random(seed)
    short = 4 if small else 1  # --smoke: a quarter of the words (the small tokenizer spends more tokens per word)
    path = folder / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 80) // short))
            answers = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60) // short)) for _ in range(2)]
            handle.write(json.dumps({"prompt": [{"role": "user", "content": prompt}], "chosen": answers[0],
                                     "rejected": answers[1]}) + "\n")
    return path


def messages(record: dict) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Review: {record['text']}"}]


# ------------------------------------------------------------------------------------------------ SFT sides


# Hone's extra sides (every phase): the option that adds each, the settings it changes from Hone's defaults, the
# environment it runs in, and the option's help.
EXTRA_SIDES = {
    "hone-compiled": ("compile", {"compile": True}, {},
                      "also run Hone with compile=true (torch.compile of each decoder layer; its compile time counts)"),
    "hone-padded": ("padded", {"packing": False}, {},
                    "also run Hone with packing=false (padded length-grouped micro-batches on sdpa): what packing "
                    "buys on this GPU"),
    "hone-cudagraphs": ("cuda_graphs", {"cuda_graphs": True}, {},
                        "also run Hone with cuda_graphs=true (static packed rows replayed as CUDA graphs, compile "
                        "time included)"),
    # PEFT's own LoRA layers: 42% more operations a step than the fused ones, but less Python per layer
    # (bench/README.md, "What a launch-bound GPU step launches"); which costs a GPU's host more?
    "hone-unfused": ("unfused", {}, {"HONE_FUSED_LORA": "0"},
                     "also run Hone with PEFT's own LoRA layers (HONE_FUSED_LORA=0)"),
}


def sft_task(args, folder: Path):
    """The SFT phase's task: `sft_data`'s records in `folder`, Hone's prompt program for them (both sides train on
    the token sequences it makes)."""
    from honellm.task import Task

    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_data(args.model, args.examples, args.max_length)))
    return Task.from_config({"name": "bench", "model": args.model, "data": {"train": str(data)},
                             "prompt": {"system": SYSTEM, "template": "Review: {text}"}, "target": "label",
                             "choices": ["positive", "negative"]})


def sft_sequences(args, config) -> list:
    """Hone's training sequences of the SFT phase under `config` (token ids, and labels -100 outside the answer):
    what TRL's side is given pre-tokenized, so that both sides take the loss on the same tokens. (From text, TRL's
    prompt-completion tokenization keeps the chat template's newline after `<|im_end|>` in each answer: one more
    token, and one more loss term, per example.)"""
    from honellm.models import load_tokenizer
    from honellm.program import PromptProgram
    from honellm.tuning.sft import _encode_split

    with tempfile.TemporaryDirectory() as tmp:
        task = sft_task(args, Path(tmp))
        return _encode_split(task, PromptProgram.from_task(task), load_tokenizer(args.model), "train", config)


def sft_settings(args) -> tuple[str, dict]:
    """Hone's SFT method and settings on the phase (before an extra side's lever)."""
    full = args.kind == "sft-full"
    settings = dict(epochs=1, batch_size=args.batch_size, max_length=args.max_length, lr=2e-5 if full else 2e-4,
                    eval_every=0, save_every=0, seed=0, warmup_ratio=0.05, schedule="cosine")
    if not full:
        settings.update(r=8, alpha=16, target_modules="all-linear")
    return ("full" if full else "lora"), settings


def sft_hone(args) -> dict:
    import torch

    from honellm.runs import read_metrics
    from honellm.tuning import get_method
    from honellm.tuning.sft import tune

    with tempfile.TemporaryDirectory() as tmp:
        task = sft_task(args, Path(tmp))
        method, settings = sft_settings(args)
        if args.worker in EXTRA_SIDES:
            settings.update(EXTRA_SIDES[args.worker][1])
            os.environ.update(EXTRA_SIDES[args.worker][2])
        skips = _cudagraph_skips() if settings.get("cuda_graphs") else None
        tune(task, method, get_method(method).config(**settings), out=Path(tmp) / "run")
        metrics = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    start = next(r for r in metrics if r.get("event") == "start")
    steps = [r for r in metrics if "loss" in r]
    # after the first two steps (warm-up, and for compile=true the compile itself)
    steady = (sum(r["tokens"] for r in steps[2:]) / (steps[-1]["time"] - steps[1]["time"])
              if len(steps) > 3 and steps[-1]["time"] > steps[1]["time"] else None)
    return {"tokens": sum(r["tokens"] for r in steps), "seconds": steps[-1]["time"] - start["time"],
            "steady_tokens_per_second": steady,
            "losses": [r["loss"] for r in steps], "peak_memory_bytes": _peak(),
            "settings": {"packing": start.get("packing"), "unpacked_because": start.get("unpacked_because"),
                         "cuda_graphs": start.get("cuda_graphs"),
                         "liger": start.get("liger"),
                         "attention": start.get("attention"), "precision": start.get("precision"),
                         **({"cudagraph_skips": sorted(set(skips))[:5]} if skips is not None else {})},
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def _cudagraph_skips() -> list[str]:
    """The reasons torch.compile gives for running a layer without CUDA graphs ("skipping cudagraphs due to ..."),
    collected while the cuda_graphs side runs: a side that gained nothing says why."""
    import logging

    import torch

    found: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if "skipping cudagraphs" in message:
                found.append(message[:200])

    torch._logging.set_logs(cudagraphs=True)  # the artifact logger the reasons go to (its debug lines stay in stderr)
    logging.getLogger("torch._inductor.cudagraph_utils.__cudagraphs").addHandler(Keep())
    return found


def sft_trl(args) -> dict:
    import importlib.util

    import torch
    from bench_dpo import hone_batch_order  # the TRL-side helpers, beside this file
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from honellm.tuning import get_method

    full = args.kind == "sft-full"
    cuda = torch.cuda.is_available()
    # Hone's token sequences, pre-tokenized (TRL then skips its own tokenization and takes the labels as given), in
    # the order of Hone's batches where TRL can read them so
    method, settings = sft_settings(args)
    hone_config = get_method(method).config(**settings)
    sequences = sft_sequences(args, hone_config)
    order = hone_batch_order([len(s) for s in sequences], hone_config, SFTConfig)
    if order is not None:
        sequences = [sequences[i] for i in order]
    dataset = Dataset.from_list([{"input_ids": s.input_ids, "labels": s.labels} for s in sequences])
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    kwargs = {"attn_implementation": "flash_attention_2"} if flash else {}
    # LoRA: bf16 weights (TRL's fastest); full fine-tuning: fp32 master weights with bf16 autocast, as Hone.
    dtype = torch.float32 if full or not cuda else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lora = None if full else LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                        task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=tmp, per_device_train_batch_size=args.batch_size, num_train_epochs=1,
                           learning_rate=2e-5 if full else 2e-4, lr_scheduler_type="cosine", warmup_steps=0.05,
                           bf16=cuda, use_cpu=not cuda, max_length=args.max_length, logging_steps=1,
                           save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True,
                           gradient_checkpointing=False, padding_free=flash, use_liger_kernel=liger,
                           completion_only_loss=True,
                           **({"train_sampling_strategy": "sequential"} if order is not None else {}))
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora)
        tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens, "seconds": seconds, "losses": losses, "peak_memory_bytes": _peak(),
            "settings": {"padding_free": flash, "liger": liger, "dtype": str(dtype), "hone_batches": order is not None},
            "device": "cuda" if cuda else "cpu"}


def _peak() -> int:
    import torch

    from honellm.training.monitor import peak_memory_bytes

    return peak_memory_bytes("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------ driver


def _run(command: list[str], timeout: float, extra_env: dict | None = None) -> tuple[dict | None, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "HF_HUB_OFFLINE": "1", "HONE_QUIET": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true",
           **(extra_env or {})}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    found = [line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith((MARK, "BENCH "))]
    if done.returncode != 0 or not found:
        return None, (done.stderr or done.stdout)[-3000:]
    return json.loads(found[-1]), ""


def run_phase(name: str, args, models: dict, folder: Path, left: float) -> dict:
    kind, shape, examples, batch = PHASES[name]
    shape = "tiny" if args.smoke else shape
    model = str(models[shape])
    if args.smoke:
        examples, batch = 8, 4
    sides: dict[str, dict] = {}
    extra = [side for side, (option, *_) in EXTRA_SIDES.items() if getattr(args, option)]
    for side in ("hone", *extra, "trl"):
        env = None
        if kind.startswith("sft"):
            cmd = [sys.executable, __file__, "--worker", side, "--kind", kind, "--model", model, "--examples",
                   str(examples), "--batch-size", str(batch), "--max-length", str(256 if args.smoke else args.max_length)]
        elif kind == "dpo":
            steps, warmup = (1, 1) if args.smoke else (6, 2)
            data = dpo_pairs((steps + warmup) * batch, folder, small=args.smoke)
            cmd = [sys.executable, str(ROOT / "bench" / "bench_dpo.py"), "--side", side, "--data", str(data),
                   "--model", model, "--batch-size", str(batch), "--max-length", "160" if args.smoke else "256",
                   "--steps", str(steps),
                   "--warmup", str(warmup), "--r", "16"]
        else:
            size = ["--prompts", "2", "--group", "2", "--max-new-tokens", "4", "--steps", "1", "--warmup", "0"] \
                if args.smoke else ["--prompts", "4", "--group", "8", "--max-new-tokens", "64", "--steps", "1",
                                    "--warmup", "1"]
            cmd = [sys.executable, str(ROOT / "bench" / "bench_grpo_trl.py"), "--side", side, "--model", model,
                   *size]
        if not kind.startswith("sft") and side in EXTRA_SIDES:  # Hone's side with one more setting (or variable)
            _, settings, env, _ = EXTRA_SIDES[side]
            cmd[cmd.index("--side") + 1] = "hone"
            cmd += [f"--hone-set={key}={str(value).lower()}" for key, value in settings.items()]
        started = time.perf_counter()
        found, error = _run(cmd, left, env)
        left -= time.perf_counter() - started
        sides[side] = found if found is not None else {"error": error}
    return {"phase": name, "kind": kind, "shape": shape, "params": _params(models[shape]), **sides}


# issue 22's targets: Hone / TRL speed per phase kind, the 1.7B shape's full fine-tuning MFU
SPEED_TARGET, MFU_TARGET, FIRST_LOSS_TOLERANCE = 1.5, 0.35, 0.05


def target_lines(results: list[dict], peak: float | None) -> list[str]:
    """Each measured phase against issue 22's targets: LoRA SFT, DPO and GRPO at least 1.5x TRL's speed, full
    fine-tuning of the 1.7B shape at 35% MFU or more, the SFT and DPO sides' first losses within 5% of each other
    and their loss curves' trend the same."""
    lines = []
    for r in results:
        hone, trl = r.get("hone", {}), r.get("trl", {})
        name = r["phase"]
        if r.get("skipped") or "ratio" not in r:
            lines.append(f"{name}: not measured")
            continue
        if r["kind"] == "sft-full" and r["shape"] == "1.7b":
            if peak is None:
                lines.append(f"{name}: MFU unknown (no dense bf16 peak for this device)")
            else:
                mfu = 6 * r["params"] * hone["tokens_per_second"] / peak
                lines.append(f"{name}: Hone MFU {100 * mfu:.1f}% (target {100 * MFU_TARGET:.0f}%): "
                             + ("met" if mfu >= MFU_TARGET else "missed"))
        elif r["kind"] != "sft-full":
            levers = [(key.removeprefix("ratio_"), value) for key, value in r.items() if key.startswith("ratio_")]
            lines.append(f"{name}: {r['ratio']:.2f}x TRL (target {SPEED_TARGET}x): "
                         + ("met" if r["ratio"] >= SPEED_TARGET else "missed")
                         + "".join(f"; with {lever}: {ratio:.2f}x, " + ("met" if ratio >= SPEED_TARGET else "missed")
                                   for lever, ratio in levers))
        if r["kind"] in ("sft-lora", "sft-full", "dpo") and hone.get("losses") and trl.get("losses"):
            # the first step's batch is the same on both sides where TRL read Hone's order, else a random one (DPO's
            # first loss is log 2 on both sides whatever the batch: the policy starts as the reference)
            a, b = hone["losses"][0], trl["losses"][0]
            agree = abs(a - b) <= FIRST_LOSS_TOLERANCE * max(abs(b), 1e-9)
            lines.append(f"{name}: first losses Hone {a:.4f}, TRL {b:.4f}: "
                         + ("agree" if agree else f"differ by more than {100 * FIRST_LOSS_TOLERANCE:.0f}%"))
            lines.append(f"{name}: " + trend_line(hone["losses"], trl["losses"],
                                                  bool(trl.get("settings", {}).get("hone_batches"))))
    return lines


def trend_line(hone: list[float], trl: list[float], same_batches: bool = False) -> str:
    """The loss curves' trend on both sides: the mean loss of the first and of the last quarter of the steps (the
    same trend is both falling, or both not); where TRL read Hone's batches in Hone's order
    (`bench_dpo.hone_batch_order`), also the mean gap between the two sides' losses step by step."""
    if min(len(hone), len(trl)) < 8:
        return f"loss trend: too few steps to compare ({len(hone)} and {len(trl)})"
    ends = [(statistics.fmean(x[: len(x) // 4]), statistics.fmean(x[-(len(x) // 4):])) for x in (hone, trl)]
    falls = [last < first for first, last in ends]
    (a, b), (c, d) = ends
    gap = ""
    if same_batches:
        gaps = [abs(x - y) / max(abs(y), 1e-9) for x, y in zip(hone, trl, strict=False)]
        gap = f"; on the same batches the losses differ by {100 * statistics.fmean(gaps):.1f}% a step on average"
    return (f"loss trend (first -> last quarter of the steps): Hone {a:.4f} -> {b:.4f}, TRL {c:.4f} -> {d:.4f}{gap}: "
            + ("same trend" if falls[0] == falls[1] else "different trends"))


def _params(folder: Path) -> int:
    config = json.loads((Path(folder) / "config.json").read_text())
    h, i, n, v = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * per_layer + v * h * (1 if config.get("tie_word_embeddings") else 2) + h


def _gpu_peak() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


def report(result: dict, peak: float | None) -> None:
    hone, trl = result.get("hone", {}), result.get("trl", {})
    print(f"\n== {result['phase']} ({result['shape']} shape, {result['params'] / 1e6:.0f}M parameters)")
    for side in ("hone", *EXTRA_SIDES, "trl"):
        if side not in result:
            continue
        r = result[side]
        if "error" in r:
            print(f"  {side}: failed: {r['error'][-800:]}")
            continue
        if result["kind"].startswith("sft"):
            rate = r["tokens"] / r["seconds"]
            r["tokens_per_second"] = rate
            mfu = f"  MFU {100 * 6 * result['params'] * rate / peak:.1f}%" if peak else ""
            print(f"  {side}: {rate:9.0f} tokens/s{mfu}  peak {r['peak_memory_bytes'] / 2**30:.2f} GiB  "
                  f"{r['seconds']:.1f} s  first losses {[round(x, 4) for x in r['losses'][:4]]}  {r.get('settings')}")
        else:
            rate = r.get("tokens_per_step", r.get("generated_tokens", 0)) / r["step_seconds"]
            r["tokens_per_second"] = rate
            losses = r.get("losses") or r.get("rewards") or []
            print(f"  {side}: {r['step_seconds']:.2f} s/step  {rate:9.0f} tokens/s  peak "
                  f"{r['peak_memory_bytes'] / 2**30:.2f} GiB  first {'losses' if 'losses' in r else 'rewards'} "
                  f"{[round(x, 4) for x in losses[:4]]}" + ("  (vLLM)" if r.get("vllm") else "")
                  + (f"  {r['settings']}" if r.get("settings") else ""))
    if "tokens_per_second" in hone and "tokens_per_second" in trl:
        # SFT: tokens/s (both sides count the real tokens of the same records). DPO and GRPO: the step time on the
        # same pairs or prompts (the sides count a step's tokens differently: padding, the prompt once or twice).
        sft = result["kind"].startswith("sft")
        result["ratio"] = (hone["tokens_per_second"] / trl["tokens_per_second"] if sft
                           else trl["step_seconds"] / hone["step_seconds"])
        print(f"  Hone / TRL: {result['ratio']:.2f}x {'tokens/s' if sft else 'steps/s'}, "
              f"{hone['peak_memory_bytes'] / max(trl['peak_memory_bytes'], 1):.2f}x peak memory")
    for side in EXTRA_SIDES:
        other = result.get(side, {})
        if "tokens_per_second" not in other or "tokens_per_second" not in trl:
            continue
        name, sft = side.removeprefix("hone-"), result["kind"].startswith("sft")
        result[f"ratio_{name}"] = (other["tokens_per_second"] / trl["tokens_per_second"] if sft
                                   else trl["step_seconds"] / other["step_seconds"])
        steady = [r.get("steady_tokens_per_second") for r in (hone, other)]
        after = (f"; after the first two steps {steady[1]:.0f} tokens/s against Hone's {steady[0]:.0f}"
                 if None not in steady else "")
        compiles = side in ("hone-compiled", "hone-cudagraphs")
        print(f"  Hone {name} / TRL: {result[f'ratio_{name}']:.2f}x "
              + (f"tokens/s{' (compile time included)' if compiles else ''}{after}" if sft
                 else f"steps/s (median step after the warm-up{', compiling included there' if compiles else ''})"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps (runs on a CPU)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of: {', '.join(PHASES)} "
                                                                   "(--smoke: the 135M ones, at the tiny shape)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds; later phases are skipped past it (default 450; --smoke: 1500)")
    parser.add_argument("--max-length", type=int, default=512)
    for side, (option, _, _, text) in EXTRA_SIDES.items():
        parser.add_argument("--" + option.replace("_", "-"), action="store_true",
                            help=f"every phase: {text}, a side named {side}")
    parser.add_argument("--worker", choices=("hone", *EXTRA_SIDES, "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--examples", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            found = (sft_trl if args.worker == "trl" else sft_hone)(args)
        print(MARK + json.dumps(found), flush=True)
        return

    if args.smoke and args.phases == ",".join(PHASES):  # the 1.7B phases are the 135M ones at the tiny shape
        args.phases = ",".join(n for n in PHASES if not n.endswith("1.7b"))
    names = [p for p in args.phases.split(",") if p]
    unknown = [p for p in names if p not in PHASES]
    if unknown:
        sys.exit(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    if args.budget is None:
        args.budget = 1500.0 if args.smoke else 450.0
    started = time.perf_counter()
    gpu, peak = _gpu_peak()
    print(f"bench_gpu: {gpu}{'' if peak is None else f' (dense bf16 peak {peak / 1e12:.0f} TFLOP/s)'}; "
          f"{'smoke (tiny shapes)' if args.smoke else 'SmolLM2 shapes, random weights'}; budget {args.budget:.0f} s",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        shapes = {"tiny"} if args.smoke else {PHASES[n][1] for n in names}
        models = {s: write_model(s, Path(tmp) / f"model-{s}") for s in sorted(shapes)}
        for name in names:
            left = args.budget - (time.perf_counter() - started)
            if left < 20:
                print(f"\n== {name}: skipped (the {args.budget:.0f} s budget is spent)")
                results.append({"phase": name, "skipped": True})
                continue
            result = run_phase(name, args, models, Path(tmp), left)
            report(result, peak)
            results.append(result)
    ratios = [r["ratio"] for r in results if "ratio" in r]
    print(f"\ntotal {time.perf_counter() - started:.0f} s; Hone / TRL speed: "
          + (f"median {statistics.median(ratios):.2f}x" if ratios else "no phase compared"))
    targets = target_lines(results, peak)
    print("targets (issue 22)" + (" - smoke: tiny shapes, not the targets' setting" if args.smoke else "") + ":")
    for line in targets:
        print("  " + line)
    print("BENCH_GPU " + json.dumps({"device": gpu, "smoke": args.smoke, "phases": results, "targets": targets}))


if __name__ == "__main__":
    main()
