"""Hone's LoRA SFT against TRL's SFTTrainer with PEFT: same model, data, batch size, lengths and epochs.

    python bench/bench_sft.py                      # CPU: Hone and three TRL configurations, plus this CPU's limit
    python bench/bench_sft.py --device cuda        # the same on a GPU, with MFU
    python bench/bench_sft.py --configs hone,trl-fp32-amp --examples 64

Each configuration runs in its own subprocess (so peak RSS is its own) and trains LoRA (r=8, alpha=16, every linear
layer of attention and MLP, no dropout) on the first `--examples` SST-2 training records, rendered through the
model's chat template with the task's system message and template, loss on the answer only.

Figures:
- tokens/s: real (non-padding) tokens of the training set x epochs / wall time of the training loop (model
  loading and tokenization excluded, the first steps' kernel warm-up included, for both);
- peak RSS of the subprocess (or peak allocated GPU memory on CUDA);
- the limit: achieved bf16 matmul FLOP/s on this machine (GEMMs of the model's shapes at the benchmark's token
  count per micro-batch, and a large square GEMM; the higher is used) divided by 6 x N FLOPs per training token
  (N = all parameters of the model: 2N for the forward, 4N for the backward). This is the usual dense-training
  bound; LoRA needs less (no gradient of frozen weights, and Hone skips the LM head off the answer positions),
  so a LoRA run can exceed it. It is measured after all runs (the best of `--repeat` measurements), and also in
  each run's own process right after its training loop: "% of the limit measured right after" pairs a run with
  the machine's speed at that time (this machine drifts by up to 2x over minutes), and the summary prints the
  median of those paired shares for Hone.
- on CUDA, MFU = 6 x N x tokens/s / the GPU's peak dense bf16 FLOP/s.

This benchmark prints figures; it does not pass or fail.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# HONE_BENCH_SST2 points elsewhere (e.g. a GPU machine without ../shared/data)
SST2 = Path(os.environ.get("HONE_BENCH_SST2", ROOT.parent / "shared" / "data" / "sst2" / "train.jsonl"))
SYSTEM = "Classify the sentiment of the movie review as positive or negative. Answer with one word."
TEMPLATE = "Review: {text}"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "hone": "Hone LoRA SFT (bf16 frozen weights, fp32 adapter, autocast; length-grouped batches, sparse logits)",
    "hone-compiled": "the same with compile=true (one-off torch.compile of the decoder layers included)",
    "hone-packed": "the same with packing=true (padding-free micro-batches of batch_size x longest tokens)",
    "hone-padded": "the same with packing=false (right-padded micro-batches; the CPU default)",
}
# TRL configurations are named by flags: trl-<weights>[-grouped][-nogc][-padfree], where <weights> is fp32 (no
# autocast), fp32-amp (fp32 weights, bf16=True autocast) or bf16 (weights loaded in bf16, bf16=True); grouped:
# group_by_length sampler; nogc: gradient checkpointing off (TRL's SFTConfig turns it on by default);
# padfree: padding-free batches (flattened sequences with position ids).
TRL_FLAGS = ("grouped", "nogc", "padfree")
DEFAULT_CONFIGS = "hone,trl-fp32-amp,trl-bf16,trl-fp32-amp-nogc,trl-bf16-nogc,trl-bf16-grouped-nogc"


def describe(name: str) -> str:
    if name in CONFIGS:
        return CONFIGS[name]
    weights, flags = _trl_flags(name)
    what = {"fp32": "fp32 weights, no autocast", "fp32-amp": "fp32 weights, bf16=True (autocast)",
            "bf16": "weights loaded in bf16, bf16=True"}[weights]
    extra = {"grouped": "group_by_length", "nogc": "no gradient checkpointing", "padfree": "padding_free"}
    return "TRL SFTTrainer, " + ", ".join([what, *(extra[f] for f in flags)])


def _trl_flags(name: str) -> tuple[str, list[str]]:
    parts = name.removeprefix("trl-").split("-")
    flags = [p for p in parts if p in TRL_FLAGS]
    weights = "-".join(p for p in parts if p not in TRL_FLAGS)
    return weights, flags
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
             "L4": 121e12, "RTX 4090": 165e12}


# ------------------------------------------------------------------------------------------------ data


def records(n: int) -> list[dict]:
    with open(SST2, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return rows[:n]


def messages(record: dict) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TEMPLATE.format(**record)}]


# ------------------------------------------------------------------------------------------------ workers


def peak_memory(device: str) -> int:
    from honellm.training.monitor import peak_memory_bytes

    return peak_memory_bytes(device)


def run_hone(args) -> dict:
    from honellm.models import load_tokenizer
    from honellm.runs import read_metrics
    from honellm.task import Task
    from honellm.training.batching import encode_conversation
    from honellm.tuning import get_method
    from honellm.tuning.sft import tune

    rows = records(args.examples)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        task = Task.from_config({"name": "bench", "model": args.model, "data": {"train": str(data)},
                                 "prompt": {"system": SYSTEM, "template": TEMPLATE}, "target": "label",
                                 "choices": ["positive", "negative"]})
        spec = get_method("lora")
        config = spec.config(r=args.r, alpha=2 * args.r, target_modules=TARGETS, epochs=args.epochs,
                             batch_size=args.batch_size, max_length=args.max_length, lr=2e-4, eval_every=0,
                             save_every=0, seed=0, compile=args.worker == "hone-compiled",
                             packing={"hone-packed": True, "hone-padded": False}.get(args.worker))
        artifact = tune(task, "lora", config, out=Path(tmp) / "run")
        metrics = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    start = next(r["time"] for r in metrics if r.get("event") == "start")
    steps = [r for r in metrics if "loss" in r]
    seconds = steps[-1]["time"] - start
    tokenizer = load_tokenizer(args.model)
    tokens = sum(len(encode_conversation(tokenizer, messages(r), r["label"], max_length=args.max_length)) for r in rows)
    return {"tokens": tokens * args.epochs, "counted_tokens": sum(r["tokens"] for r in steps), "seconds": seconds,
            "cpu_seconds": artifact.manifest.cost["loop_cpu_seconds"],
            "final_loss": steps[-1]["loss"], "steps": len(steps),
            "trainable_params": artifact.manifest.cost["trainable_params"]}


def run_trl(args, config: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from honellm.models import load_tokenizer, resolve

    rows = records(args.examples)
    dataset = Dataset.from_list([{"prompt": messages(r), "completion": [{"role": "assistant", "content": r["label"]}]}
                                 for r in rows])
    cuda = args.device == "cuda"
    weights, flags = _trl_flags(config)
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    path = resolve(args.model).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = load_tokenizer(args.model)
    lora = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        sft = SFTConfig(output_dir=tmp, per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
                        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.05,
                        bf16=weights != "fp32", use_cpu=not cuda, max_length=args.max_length, logging_steps=10,
                        save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
                        train_sampling_strategy="group_by_length" if "grouped" in flags else "random",
                        gradient_checkpointing="nogc" not in flags, padding_free="padfree" in flags,
                        completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=sft, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
        tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * args.epochs
        started, cpu = time.perf_counter(), time.process_time()
        output = trainer.train()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "final_loss": output.training_loss,
            "trainable_params": trainable}


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_hone(args) if args.worker.startswith("hone") else run_trl(args, args.worker)
    result["peak_memory_bytes"] = peak_memory(args.device)
    result["tokens_per_second"] = result["tokens"] / result["seconds"]
    result["tokens_per_cpu_second"] = result["tokens"] / result["cpu_seconds"]
    # The limit again, right after this run in the same process: this machine's speed drifts by up to 2x over
    # minutes, and a run compared with the limit of its own phase is a paired measurement (see the driver).
    from honellm.models import resolve

    flops = matmul_flops(args.device, int(args.batch_size * 60), args.threads)
    result["paired_limit"] = max(flops["model_shapes"], flops["square"]) / (6 * _count_params(resolve(args.model).path))
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ the limit


def matmul_flops(device: str, tokens: int, threads: int | None) -> dict:
    """Achieved bf16 GEMM FLOP/s: the model's projection shapes at `tokens` rows, and a large square GEMM; by wall
    time and (on CPU) per CPU-second, the measure that other work on a shared machine disturbs least."""
    import torch
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)

    def seconds(m: int, k: int, n: int, repeats: int) -> tuple[float, float]:
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        w = torch.randn(n, k, dtype=torch.bfloat16, device=device)
        for _ in range(3):
            F.linear(x, w)
        wall = cpu = float("inf")
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            for _ in range(repeats):
                F.linear(x, w)
            if device == "cuda":
                torch.cuda.synchronize()
            wall = min(wall, (time.perf_counter() - t) / repeats)
            cpu = min(cpu, (time.process_time() - c) / repeats)
        return wall, cpu

    shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # SmolLM2-135M: q/o, k/v, gate/up, down
    weights = [2, 2, 2, 1]  # per layer: q and o, k and v, gate and up, down
    flops = sum(w * 2 * tokens * k * n for (k, n), w in zip(shapes, weights, strict=True))
    timed = [(w, seconds(tokens, k, n, 20)) for (k, n), w in zip(shapes, weights, strict=True)]
    big = 2048 if device == "cpu" else 8192
    square_wall, square_cpu = seconds(big, big, big, 5 if device == "cpu" else 20)
    return {"model_shapes": flops / sum(w * t[0] for w, t in timed), "square": 2 * big**3 / square_wall,
            "model_shapes_per_cpu_second": flops / sum(w * t[1] for w, t in timed),
            "square_per_cpu_second": 2 * big**3 / square_cpu}


# ------------------------------------------------------------------------------------------------ driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--examples", type=int, default=200, help="SST-2 training records to train on")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="hone, hone-compiled, trl-... (see TRL_FLAGS)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the configurations this many times, interleaved, and keep each one's best run "
                             "(on a shared machine the best run is the one least disturbed by other work)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not SST2.exists():
        sys.exit(f"SST-2 not found at {SST2} (the benchmark reads ../shared/data beside the project)")

    from honellm.models import resolve

    config = json.loads((resolve(args.model).path / "config.json").read_text())
    n_params = _count_params(resolve(args.model).path)
    print(f"model {args.model}: N = {n_params / 1e6:.1f}M parameters ({config.get('model_type')}); "
          f"{args.examples} SST-2 examples x {args.epochs} epoch(s), batch {args.batch_size}, LoRA r={args.r} on "
          f"{', '.join(TARGETS)}; device {args.device}, threads {args.threads or 'default'}; "
          f"load average {os.getloadavg()[0]:.1f}")
    results: dict[str, dict] = {}
    names = args.configs.split(",")
    for name in [n for _ in range(args.repeat) for n in names]:
        env = {**os.environ, "HONE_QUIET": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--examples", str(args.examples),
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--r", str(args.r), "--threads", str(args.threads), "--device", args.device]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(line[len("RESULT "):])
        runs = results.get(name, {}).get("runs", []) + [round(r["tokens_per_second"], 1)]
        shares = results.get(name, {}).get("paired_shares", []) + [r["tokens_per_second"] / r["paired_limit"]]
        if name not in results or r["tokens_per_second"] > results[name]["tokens_per_second"]:
            results[name] = r
        results[name]["runs"] = runs
        results[name]["paired_shares"] = shares
        print(f"{name:24s} {r['tokens_per_second']:8.1f} tokens/s  {r['tokens_per_cpu_second']:8.1f} tokens/CPU-s  "
              f"{r['seconds']:7.1f} s  "
              f"peak {'GPU' if args.device == 'cuda' else 'RSS'} {r['peak_memory_bytes'] / 2**30:5.2f} GiB  "
              f"loss {r['final_loss']:.4f}  {100 * r['tokens_per_second'] / r['paired_limit']:.0f}% of the limit "
              f"measured right after ({r['paired_limit']:.0f} tokens/s)  ({describe(name)})", flush=True)

    tokens_per_batch = int(args.batch_size * 60)
    measured = [matmul_flops(args.device, tokens_per_batch, args.threads) for _ in range(args.repeat)]
    flops = {key: max(m[key] for m in measured) for key in measured[0]}
    best_flops = max(flops["model_shapes"], flops["square"])
    limit = best_flops / (6 * n_params)
    print(f"\nbf16 matmul on this {args.device}: {flops['model_shapes'] / 1e12:.3f} TFLOP/s on the model's shapes "
          f"({tokens_per_batch} rows), {flops['square'] / 1e12:.3f} TFLOP/s on a large square GEMM")
    print(f"limit = {best_flops / 1e12:.3f} TFLOP/s / (6 x {n_params / 1e6:.1f}M FLOPs per token) = "
          f"{limit:.0f} tokens/s")
    cpu_limit = None
    if args.device == "cpu":
        best_cpu = max(flops["model_shapes_per_cpu_second"], flops["square_per_cpu_second"])
        cpu_limit = best_cpu / (6 * n_params)
        print(f"per CPU-second: {best_cpu / 1e12:.3f} TFLOP -> limit {cpu_limit:.0f} tokens per CPU-second "
              "(compare with tokens/CPU-s above; meaningful with --threads 1)")
    if args.repeat > 1:
        print("best of " + str(args.repeat) + " runs each: " + "; ".join(
            f"{k} {v['tokens_per_second']:.0f} tokens/s (runs: {v['runs']})" for k, v in results.items()))
    trl = {k: v for k, v in results.items() if k.startswith("trl")}
    for key in [k for k in results if k.startswith("hone-")]:
        print(f"{key}: {results[key]['tokens_per_second']:.0f} tokens/s, {results[key]['tokens_per_cpu_second']:.0f} "
              "tokens per CPU-second")
    if "hone" in results:
        hone = results["hone"]["tokens_per_second"]
        print(f"Hone: {hone:.0f} tokens/s = {100 * hone / limit:.0f}% of the limit")
        shares = sorted(results["hone"]["paired_shares"])
        print(f"Hone, paired (each run against the limit measured right after it in its process): median "
              f"{100 * statistics.median(shares):.0f}% of the limit (runs: {', '.join(f'{100 * x:.0f}%' for x in shares)})")
        if cpu_limit:
            per_cpu = results["hone"]["tokens_per_cpu_second"]
            print(f"Hone: {per_cpu:.0f} tokens per CPU-second = {100 * per_cpu / cpu_limit:.0f}% of the per-CPU-second limit")
        if trl:
            best = max(trl, key=lambda k: trl[k]["tokens_per_second"])
            print(f"best TRL configuration: {best} ({trl[best]['tokens_per_second']:.0f} tokens/s): Hone is "
                  f"{hone / trl[best]['tokens_per_second']:.1f}x faster, with "
                  f"{results['hone']['peak_memory_bytes'] / trl[best]['peak_memory_bytes']:.2f}x its peak memory")
            best_cpu = max(trl, key=lambda k: trl[k]["tokens_per_cpu_second"])
            print(f"per CPU-second: best TRL {best_cpu} {trl[best_cpu]['tokens_per_cpu_second']:.0f}; Hone is "
                  f"{results['hone']['tokens_per_cpu_second'] / trl[best_cpu]['tokens_per_cpu_second']:.1f}x")
    if args.device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        for key, r in results.items():
            if peak:
                print(f"MFU {key}: {100 * 6 * n_params * r['tokens_per_second'] / peak:.1f}% of {name}'s "
                      f"{peak / 1e12:.0f} TFLOP/s bf16 peak")
            else:
                print(f"MFU {key}: unknown peak for {name}; 6N x tokens/s = "
                      f"{6 * n_params * r['tokens_per_second'] / 1e12:.1f} TFLOP/s")
    print("RESULTS " + json.dumps({"results": results, "flops": flops, "limit": limit, "cpu_limit": cpu_limit,
                                   "n_params": n_params, "load_average": os.getloadavg()[0]}))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _count_params(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                shape = handle.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


if __name__ == "__main__":
    main()
