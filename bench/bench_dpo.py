"""DPO step time and peak memory: Hone's DPO recipe against TRL's `DPOTrainer`, same data and settings.

Both sides train a LoRA adapter (same rank, alpha, target modules, no dropout) on the same base model with the
same bf16 policy (frozen weights bf16, adapter fp32, bf16 autocast), batch size, max length, optimizer settings
(AdamW, constant lr, no warmup, clip 1.0) and gradient checkpointing setting, on the same HH-RLHF pairs. The pairs
are the first ones whose chosen and rejected sequences are within 64 tokens below `--max-length`, so that neither
side truncates; TRL reads them in the order of Hone's length-grouped batches (a sequential sampler), so both sides
train on the same pairs step by step and their losses compare step by step (TRL's tokens differ by the newline its
chat template keeps after each answer's end of turn). The reference log-probs are computed
before training on both sides (TRL `precompute_ref_log_probs=True`, what Hone always does); `--trl-reference
both` adds TRL's default, a reference forward with the adapter disabled at every step.

Each side runs in its own subprocess (a clean peak RSS / CUDA peak), trains `--warmup` + `--steps` steps, and
reports the median wall time of the timed steps (batch collation included), the tokens they forward, and the
peak memory of the process (CPU: peak RSS; CUDA: `torch.cuda.max_memory_allocated`). It prints figures and
the ratio; it asserts nothing. Runs on CUDA when a GPU is present (the same command).

    python bench/bench_dpo.py [--model smollm2-135m-instruct] [--batch-size 4] [--max-length 256] [--steps 6]
                              [--trl-reference precompute|both] [--quick] [--hone-set compile=true ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MARK = "BENCH "


# ------------------------------------------------------------------------------------------------ data


def prepare_data(args, folder: Path) -> Path:
    """Write the benchmark's pairs (conversational prompt/chosen/rejected) to `folder/pairs.jsonl`."""
    from honellm.models import load_tokenizer
    from honellm.program import PromptProgram
    from honellm.reward.recipes.common import encode_pairs
    from honellm.task import Task

    task = Task.load(ROOT / "examples" / "hh_rlhf.yaml", [f"model={args.model}"])
    tokenizer = load_tokenizer(args.model)
    program = PromptProgram.from_task(task)
    pairs = task.pairs("train")
    encoded = encode_pairs(task, program, tokenizer, "train", max_length=10**6)
    low, high = args.max_length - 64, args.max_length - 2  # TRL's template adds a newline after the end of turn
    keep = [i for i, e in enumerate(encoded) if low <= e.length <= high]
    need = (args.warmup + args.steps) * args.batch_size
    if len(keep) < need:
        raise SystemExit(f"only {len(keep)} pairs of {low}-{high} tokens; lower --steps or --batch-size")
    path = folder / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i in keep[:need]:
            p = pairs[i]
            handle.write(json.dumps({"prompt": program.chat_messages(p.prompt), "chosen": p.chosen,
                                     "rejected": p.rejected}) + "\n")
    return path


def step_timer():
    """A transformers `TrainerCallback` that records when training began and when each step ended (the TRL side of
    a bench; bench_grpo_trl.py uses it too): `step_seconds(warmup)` is the time of each step after the first
    `warmup`."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.begin = None

        def on_train_begin(self, *_, **__):
            self.begin = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

        def step_seconds(self, warmup: int) -> list[float]:
            ends = [self.begin, *self.ends]
            return [b - a for a, b in zip(ends, ends[1:], strict=False)][warmup:]

    return StepTimes()


def run_side(command: list[str], side: str) -> dict:
    """Run one side of a bench in its own process (a clean peak memory) and return the JSON line it printed after
    `MARK`; a failed side stops the bench with its error output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "HF_HUB_OFFLINE": "1", "HONE_QUIET": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    found = [line[len(MARK):] for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not found:
        raise SystemExit(f"the {side} side failed:\n{done.stderr[-4000:]}")
    return json.loads(found[-1])


def peak_memory(device: str) -> int:
    from honellm.training.monitor import peak_memory_bytes

    return peak_memory_bytes(device)


# ------------------------------------------------------------------------------------------------ the two sides


def hone_settings(items: list[str]) -> dict:
    """`--hone-set compile=true ...`: more settings of Hone's side, values read as YAML."""
    found = {}
    for item in items:
        key, _, value = item.partition("=")
        found[key] = yaml.safe_load(value)
    return found


def hone_config(args, **extra):
    """Hone's DPO settings on the benchmark (what `run_hone` trains with), `extra` (`--hone-set`) on top."""
    from honellm.reward.recipes.preference import DPOConfig

    return DPOConfig(**dict(max_steps=args.warmup + args.steps, batch_size=args.batch_size,
                            max_length=args.max_length, r=args.r, alpha=2 * args.r, lr=args.lr, beta=0.1,
                            schedule="constant", warmup_steps=0, eval_every=0, save_every=0,
                            eval_batch_size=args.batch_size * 2, seed=0,
                            gradient_checkpointing=args.gradient_checkpointing) | extra)


def bench_task(args, data: Path):
    from honellm.task import Task

    return Task.from_config({"name": "bench-dpo", "model": args.model, "data": {"train": str(data)}})


def hone_batch_order(lengths: list[int], config, trainer_config) -> list[int] | None:
    """The examples (indices into `lengths`) Hone's recipe trains on with `config`, step after step: its
    length-grouped global batches of the whole run one after another (the recipe's own `plan_steps`; an example may
    come back in a later epoch). A TRL trainer reading its rows in this order (a sequential sampler) trains on
    Hone's batches step by step, so the two sides' losses compare like for like. None where a batch of Hone's is
    not full (TRL's fixed-size batches would drift from them) or `trainer_config` (TRL's config class) has no
    sequential sampling. bench_gpu.py's SFT phase uses it too."""
    import dataclasses

    from honellm.training.loop import plan_steps

    if "train_sampling_strategy" not in {f.name for f in dataclasses.fields(trainer_config)}:
        return None
    plan = plan_steps(lengths, config, world=1, validating=False, where="bench")
    batches = [plan.sampler.global_batch(step) for step in range(plan.total_steps)]
    if any(len(batch) != config.batch_size for batch in batches):
        return None
    return [int(i) for batch in batches for i in batch]


def hone_order(args, data: Path) -> list[int] | None:
    """`hone_batch_order` of the pairs in `data` (their line numbers) under the benchmark's DPO settings."""
    from trl import DPOConfig

    from honellm.models import load_tokenizer
    from honellm.program import PromptProgram
    from honellm.reward.recipes.common import encode_pairs

    task = bench_task(args, data)
    pairs = encode_pairs(task, PromptProgram.from_task(task), load_tokenizer(args.model), "train",
                         max_length=args.max_length)
    return hone_batch_order([p.length for p in pairs], hone_config(args), DPOConfig)


def run_hone(args, data: Path, out: Path) -> dict:
    """The DPO recipe itself (`hone align --method dpo`), timed from its metrics.jsonl."""
    import torch

    from honellm.reward.recipes.preference import train_preference
    from honellm.runs import read_metrics

    task = bench_task(args, data)
    config = hone_config(args, **hone_settings(args.hone_set))
    started = time.perf_counter()
    train_preference(task, config, method="dpo", out=out)
    total = time.perf_counter() - started
    rows = read_metrics(out / "metrics.jsonl")
    start = next(r for r in rows if r.get("event") == "start")
    steps = [r for r in rows if "loss" in r]
    times = [start["time"]] + [r["time"] for r in steps]
    seconds = [b - a for a, b in zip(times, times[1:], strict=False)][args.warmup:]
    tokens = [r["tokens"] for r in steps][args.warmup:]
    reference = next(r for r in rows if r.get("event") == "reference")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"side": "hone", "step_seconds": statistics.median(seconds), "tokens_per_step": statistics.mean(tokens),
            "reference_seconds": reference["seconds"], "peak_memory_bytes": peak_memory(device),
            "losses": [r["loss"] for r in steps], "total_seconds": round(total, 1), "device": device,
            "settings": {k: start.get(k) for k in ("attention", "packing", "unpacked_because", "cuda_graphs")}
            | {"compile": config.compile}}


def run_trl(args, data: Path, out: Path, *, precompute: bool) -> dict:
    """TRL's DPOTrainer with the same model, LoRA, batch, lengths and bf16 policy."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from honellm.hardware import pick_dtype
    from honellm.models import resolve
    from honellm.tuning.targets import resolve_targets

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve(args.model).path
    dtype = pick_dtype("auto", device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    order = hone_order(args, data)  # Hone's batches, in Hone's order, where TRL can read them so
    if order is not None:
        rows = [rows[i] for i in order]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    peft_config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=resolve_targets(model.config.model_type, "all-linear"))
    config = DPOConfig(output_dir=str(out), per_device_train_batch_size=args.batch_size, max_length=args.max_length,
                       max_steps=args.warmup + args.steps, learning_rate=args.lr, beta=0.1,
                       lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                       bf16=dtype == torch.bfloat16, use_cpu=device == "cpu",
                       gradient_checkpointing=args.gradient_checkpointing, precompute_ref_log_probs=precompute,
                       precompute_ref_batch_size=args.batch_size * 2, logging_steps=1, save_strategy="no",
                       report_to=[], seed=0, dataloader_num_workers=0, disable_tqdm=True,
                       **({"train_sampling_strategy": "sequential"} if order is not None else {}))

    timer = step_timer()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[timer])
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    seconds = timer.step_seconds(args.warmup)
    # tokens a step forwards: the pairs in TRL's tokenization (prompt + each answer); in Hone's order the timed
    # steps' own pairs (what Hone's side counts), else the mean pair of the data
    tokenized = trainer.train_dataset
    per_pair = [2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in tokenized]
    if order is not None and len(per_pair) == len(order):
        per_pair = per_pair[args.warmup * args.batch_size:]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"side": "trl" + ("" if precompute else " (reference every step)"),
            "step_seconds": statistics.median(seconds), "tokens_per_step": statistics.mean(per_pair) * args.batch_size,
            "reference_seconds": None, "peak_memory_bytes": peak_memory(device), "losses": losses,
            "total_seconds": round(total, 1), "device": device, "settings": {"hone_batches": order is not None}}


# ------------------------------------------------------------------------------------------------ driver


def subprocess_side(args, side: str, data: Path) -> dict:
    command = [sys.executable, __file__, "--side", side, "--data", str(data), "--model", args.model,
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--r", str(args.r), "--lr", str(args.lr)]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    return run_side(command, side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step (2x sequences)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on both sides (default: off on both)")
    parser.add_argument("--trl-reference", choices=("precompute", "both"), default="both")
    parser.add_argument("--quick", action="store_true", help="3 timed steps, TRL with precomputed reference only")
    parser.add_argument("--hone-set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more setting of Hone's side (compile=true, cuda_graphs=true, packing=false); "
                             "repeatable")
    parser.add_argument("--side", choices=("hone", "trl", "trl-live"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        import contextlib
        import io

        noise = io.StringIO()
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(noise):
            if args.side == "hone":
                found = run_hone(args, Path(args.data), Path(tmp) / "run")
            else:
                found = run_trl(args, Path(args.data), Path(tmp) / "run", precompute=args.side == "trl")
        print(MARK + json.dumps(found), flush=True)
        return
    if args.quick:
        args.steps, args.trl_reference = 3, "precompute"

    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(args, Path(tmp))
        sides = ["hone", "trl"] + (["trl-live"] if args.trl_reference == "both" else [])
        results = [subprocess_side(args, side, data) for side in sides]

    device = results[0]["device"]
    print(f"DPO step, {args.model}, LoRA r={args.r} all-linear, batch {args.batch_size} pairs, max_length "
          f"{args.max_length}, bf16 policy, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{device}; median of {args.steps} steps after {args.warmup}")
    print(f"{'side':34s} {'s/step':>8s} {'tokens/step':>12s} {'tokens/s':>9s} {'peak GiB':>9s} {'ref pass s':>11s}")
    for r in results:
        ref = f"{r['reference_seconds']:.1f}" if r["reference_seconds"] is not None else "-"
        print(f"{r['side']:34s} {r['step_seconds']:8.2f} {r['tokens_per_step']:12.0f} "
              f"{r['tokens_per_step'] / r['step_seconds']:9.0f} {r['peak_memory_bytes'] / 2**30:9.2f} {ref:>11s}")
    hone = results[0]
    for r in results[1:]:
        print(f"{r['side']} / hone: step time x{r['step_seconds'] / hone['step_seconds']:.2f}, "
              f"peak memory x{r['peak_memory_bytes'] / hone['peak_memory_bytes']:.2f}")
    print("first losses: " + "; ".join(f"{r['side']}: {[round(x, 4) for x in r['losses'][:3]]}" for r in results))


if __name__ == "__main__":
    main()
