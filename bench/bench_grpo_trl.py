"""A GRPO step, rollouts and update, against TRL's `GRPOTrainer`: same model, prompts, group size and lengths.

Both sides train a LoRA adapter (same rank, alpha, target modules, no dropout) of the same base model with the same
bf16 policy (frozen weights bf16, adapter fp32, bf16 autocast) on the built-in `arithmetic` task's prompts and its
reward functions (Hone's reward functions follow TRL's calling convention, so TRL receives the same callables). One
step = `--prompts` prompts x `--group` completions of at most `--max-new-tokens` tokens sampled at `--temperature`,
scored, and one optimizer update over them (TRL: `per_device_train_batch_size = group`, `gradient_accumulation_steps
= steps_per_generation = prompts`, so one generation batch feeds one optimizer step, as Hone's default); the same
loss (`dapo`), `beta` (KL to the adapter-disabled reference), clip range and learning rate.

Each side runs in its own subprocess, trains `--warmup` + `--steps` steps and reports the median wall time of the
timed steps (Hone: generation + scoring + reference + update, from its metrics.jsonl; TRL: the time between
`on_step_end` callbacks, which covers its generation, scoring, reference and update), the completion tokens it
generated, and its peak memory. It prints figures and the ratio; it asserts nothing. On a shared machine the
figures move a lot: run it alone.

    python bench/bench_grpo_trl.py [--model smollm2-135m-instruct] [--prompts 4] [--group 8] [--max-new-tokens 48]
                                   [--steps 3] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_dpo import MARK, hone_settings, peak_memory, run_side, step_timer  # noqa: E402 - the TRL-side helpers, beside this file


def run_hone(args, out: Path) -> dict:
    import torch

    from honellm.methods.catalog import run_method
    from honellm.reward.recipes.grpo import GRPOConfig
    from honellm.runs import read_metrics
    from honellm.task import Task

    task = Task.load("arithmetic", [f"model={args.model}"])
    config = GRPOConfig(max_steps=args.warmup + args.steps, prompts_per_step=args.prompts, group_size=args.group,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, lr=args.lr, r=args.r,
                        alpha=2 * args.r, dropout=0.0, kl_coef=args.beta, loss="dapo", clip_eps_high=0.2,
                        dynamic_sampling=False, overlong_buffer=0, eval_every=0, batch_size=args.group,
                        schedule="constant", warmup_ratio=0.0, save_every=0, **hone_settings(args.hone_set))
    started = time.perf_counter()
    run_method(task, "grpo", config, out=out)
    total = time.perf_counter() - started
    rows = read_metrics(out / "metrics.jsonl")
    start = next(r for r in rows if r.get("event") == "start")
    train = [r for r in rows if r.get("kind") == "train"][args.warmup:]
    seconds = [r["generation_seconds"] + r["scoring_seconds"] + r["training_seconds"] for r in train]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"side": "hone", "step_seconds": statistics.median(seconds),
            "generation_seconds": statistics.median(r["generation_seconds"] for r in train),
            "generated_tokens": statistics.mean(r["completion_length"] * args.prompts * args.group for r in train),
            "peak_memory_bytes": peak_memory(device), "rewards": [round(r["reward"], 3) for r in train],
            "total_seconds": round(total, 1), "device": device, "vllm": _vllm(),
            "settings": {**{k: start.get(k) for k in ("generation_backend", "attention", "packing", "unpacked_because",
                                                      "cuda_graphs")}, "compile": config.compile,
                         "decoding": next(r for r in rows if r.get("event") == "done").get("decoding")}}


def _vllm() -> bool:
    """vLLM generates on both sides where it is installed and a CUDA GPU is present (Hone's backend="auto"; TRL's
    colocate mode), the torch engine / transformers' generate otherwise."""
    from honellm.generation.vllm_backend import vllm_available

    return vllm_available()


def run_trl(args, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from honellm.hardware import pick_dtype
    from honellm.models import resolve
    from honellm.program import PromptProgram
    from honellm.reward.functions import task_reward
    from honellm.task import Task
    from honellm.tuning.targets import resolve_targets

    task = Task.load("arithmetic", [f"model={args.model}"])
    program = PromptProgram.from_task(task)
    records = task.split("train")
    dataset = Dataset.from_list([{"prompt": program.messages(task, r), "target": task.target(r)} for r in records])
    reward = task_reward(task)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve(args.model).path
    dtype = pick_dtype("auto", device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    peft_config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=resolve_targets(model.config.model_type, "all-linear"))
    config = GRPOConfig(output_dir=str(out), per_device_train_batch_size=args.group,
                        gradient_accumulation_steps=args.prompts, steps_per_generation=args.prompts,
                        num_generations=args.group, max_completion_length=args.max_new_tokens,
                        temperature=args.temperature, top_p=1.0, beta=args.beta, loss_type="dapo", epsilon=0.2,
                        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                        weight_decay=0.0, max_steps=args.warmup + args.steps, bf16=dtype == torch.bfloat16,
                        use_cpu=device == "cpu", logging_steps=1, save_strategy="no", report_to=[], seed=0,
                        dataloader_num_workers=0, disable_tqdm=True, reward_weights=reward.weights,
                        **({"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.5}
                           if _vllm() else {}))

    functions = []
    for name, function in zip(reward.names, reward.functions, strict=True):
        def call(prompts, completions, _f=function, **columns):
            return [float("nan") if v is None else v for v in _f(prompts=prompts, completions=completions, **columns)]

        call.__name__ = name
        functions.append(call)
    timer = step_timer()
    trainer = GRPOTrainer(model=model, reward_funcs=functions, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    seconds = timer.step_seconds(args.warmup)
    logs = [h for h in trainer.state.log_history if "reward" in h][args.warmup:]
    lengths = [h.get("completions/mean_length", 0.0) for h in logs]
    return {"side": "trl", "step_seconds": statistics.median(seconds), "generation_seconds": None,
            "generated_tokens": statistics.mean(lengths) * args.prompts * args.group if lengths else 0.0,
            "peak_memory_bytes": peak_memory(device), "rewards": [round(h["reward"], 3) for h in logs],
            "total_seconds": round(total, 1), "device": device, "vllm": _vllm()}


def subprocess_side(args, side: str) -> dict:
    command = [sys.executable, __file__, "--side", side, "--model", args.model, "--prompts", str(args.prompts),
               "--group", str(args.group), "--max-new-tokens", str(args.max_new_tokens), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--r", str(args.r), "--lr", str(args.lr), "--beta", str(args.beta),
               "--temperature", str(args.temperature)]
    return run_side(command, side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (TRL's beta, Hone's kl_coef)")
    parser.add_argument("--hone-set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more setting of Hone's side (compile=true, cuda_graphs=true); repeatable")
    parser.add_argument("--side", choices=("hone", "trl"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        import contextlib
        import io

        noise = io.StringIO()
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(noise):
            found = (run_hone if args.side == "hone" else run_trl)(args, Path(tmp) / "run")
        print(MARK + json.dumps(found), flush=True)
        return

    results = [subprocess_side(args, side) for side in ("hone", "trl")]
    print(f"GRPO step, {args.model}, LoRA r={args.r} all-linear, {args.prompts} prompts x {args.group} completions, "
          f"max {args.max_new_tokens} new tokens, temperature {args.temperature}, beta {args.beta}, loss dapo, "
          f"{results[0]['device']}; median of {args.steps} steps after {args.warmup}")
    print(f"{'side':6s} {'s/step':>8s} {'gen s':>7s} {'gen tokens':>11s} {'gen tok/s':>10s} {'peak GiB':>9s}  rewards")
    for r in results:
        gen = f"{r['generation_seconds']:.1f}" if r["generation_seconds"] is not None else "-"
        print(f"{r['side']:6s} {r['step_seconds']:8.2f} {gen:>7s} {r['generated_tokens']:11.0f} "
              f"{r['generated_tokens'] / r['step_seconds']:10.1f} {r['peak_memory_bytes'] / 2**30:9.2f}  "
              f"{r['rewards']}")
    hone, trl = results
    print(f"trl / hone: step time x{trl['step_seconds'] / hone['step_seconds']:.2f}, "
          f"peak memory x{trl['peak_memory_bytes'] / hone['peak_memory_bytes']:.2f}")


if __name__ == "__main__":
    main()
