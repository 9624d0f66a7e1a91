"""LoRA SFT on random-weight models in real shapes: tokens/s and peak memory against the memory pre-flight.

    python bench/bench_sizes.py                                 # every buildable shape, one at a time
    python bench/bench_sizes.py --shapes qwen2.5-0.5b --steps 4
    python bench/bench_sizes.py --estimate-only                 # the estimates alone (the 8B shape included)

Each shape is built offline from its public config.json values (written out below), with random weights in bf16,
and trained in its own subprocess (so the peak RSS is its own) the way `hone tune --method lora` trains: LoRA
r=16 on every linear layer of attention and MLP (fp32 adapter, frozen bf16 weights, autocast), length-grouped
micro-batches of 8, loss on the answer only, the LM head at answer positions only. The data is SST-2-like: 200
sequences of 45-110 tokens (the embedded model's chat template around an SST-2 review) ending in a 2-token answer
(a word and the end-of-turn token), random token ids (speed and memory do not depend on the ids).

Figures per shape:
- tokens/s: real tokens of the measured steps / their wall time (the first step, kernel warm-up, excluded);
- peak RSS of the subprocess (building the model included: it peaks below training);
- the pre-flight estimate (`honellm.training.memory.fit_memory` on the same sampler) and its error.

The 8B shape (Llama-3.1-8B) is never instantiated: its estimate comes from its shape alone
(`estimate_for_shape`), as `hone advise` computes it. This benchmark prints figures; it does not pass or fail.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Public config.json values (hidden size, layers, heads, vocabulary, rope) of each model.
SHAPES = {
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "tie_word_embeddings": True, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                     "max_position_embeddings": 8192},
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                     "max_position_embeddings": 32768, "sliding_window": None, "use_sliding_window": False},
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "tie_word_embeddings": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "max_position_embeddings": 131072,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "smollm2-1.7b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49152,
                     "tie_word_embeddings": True, "rope_theta": 130000.0, "rms_norm_eps": 1e-5,
                     "max_position_embeddings": 8192},
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "tie_word_embeddings": False, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "max_position_embeddings": 131072,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}
ESTIMATE_ONLY = {"llama-3.1-8b"}  # ~16 GB of bf16 weights: never built here
R, BATCH, EXAMPLES, ANSWER = 16, 8, 200, 2
GiB = 2**30


def lengths(n: int = EXAMPLES, seed: int = 0) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(45, 111, size=n).tolist()


def config_of(name: str):
    from transformers import AutoConfig

    values = dict(SHAPES[name])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def shape_estimate(name: str, *, attention: str, compute_dtype) -> dict:
    """The pre-flight's estimate from the shape alone (what `hone advise` does): bf16 weights, fp32 adapter."""
    import numpy as np

    from honellm.training.batching import LengthGroupedBatches
    from honellm.training.memory import ModelShape, estimate_for_shape, micro_batch_shapes

    shape = ModelShape.of(SHAPES[name])
    trainable = shape.lora_parameters(R)
    stored = shape.parameters() * 2 + trainable * 4
    sampler = LengthGroupedBatches(lengths(), BATCH, seed=0)
    worst = max((estimate_for_shape(shape, stored_bytes=stored, trainable=trainable, micro_batch_size=s.sequences,
                                    seq_len=s.length, loss_tokens=s.loss_tokens, compute_dtype=compute_dtype,
                                    attention=attention)
                 for s in micro_batch_shapes(sampler, loss_tokens=np.full(EXAMPLES, ANSWER), grad_accum=1)),
                key=lambda e: e.total)
    return {"shape": name, "parameters": shape.parameters(), "trainable_params": trainable,
            "estimate_bytes": worst.total, "estimate": worst.describe()}


def worker(name: str, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from honellm.core import fused
    from honellm.hardware import peak_rss_bytes, release_freed_memory
    from honellm.training.batching import IGNORE, LengthGroupedBatches, TokenSequence, collate
    from honellm.training.logprobs import sft_loss
    from honellm.training.memory import ModelShape, fit_memory, parameter_bytes
    from honellm.training.optim import build_optimizer, build_schedule
    from honellm.training.precision import Precision
    from honellm.training.setup import pick_attention, setup_accelerator
    from honellm.training.step import TrainStep
    from honellm.tuning import get_method

    torch.manual_seed(0)
    device = torch.device("cpu")
    precision = Precision.resolve("auto", device)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config_of(name), dtype=precision.compute_dtype)
    model.config.use_cache = False
    build_seconds = time.perf_counter() - started
    spec = get_method("lora")
    config = spec.config(r=R, alpha=2 * R, batch_size=BATCH)
    model = spec.apply(model, config, "")
    precision.cast_model(model)
    fused.install(model)
    release_freed_memory()
    import psutil

    before = psutil.Process().memory_info().rss  # the model, adapter and runtime, before any step
    vocab = model.config.vocab_size
    rng = torch.Generator().manual_seed(0)
    data = []
    for n in lengths():
        ids = torch.randint(0, vocab, (n,), generator=rng).tolist()
        data.append(TokenSequence(ids, [IGNORE] * (n - ANSWER) + ids[-ANSWER:]))
    sampler = LengthGroupedBatches([len(s) for s in data], BATCH, seed=0)
    attention = pick_attention(model, "auto", device=device, longest=max(len(s) for s in data))
    plan = fit_memory(model, sampler, loss_tokens=[s.num_loss_tokens for s in data], batch_size=BATCH, grad_accum=1,
                      gradient_checkpointing=False, device=device, capacity=1 << 50,
                      compute_dtype=precision.compute_dtype, attention=attention)
    accelerator = setup_accelerator()
    optimizer = build_optimizer(model, lr=2e-4, weight_decay=0.0, betas=(0.9, 0.999))
    schedule = build_schedule(optimizer, total_steps=steps, warmup_steps=0, schedule="constant", min_ratio=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = TrainStep(accelerator, model, optimizer, schedule, precision=precision)
    # the longest micro-batch first (the peak), then the sampler's order
    order = sorted(range(sampler.steps_per_epoch), key=lambda i: -sampler.lengths[sampler.global_batch(i)].max())
    times, tokens = [], []
    for i in order[:steps]:
        batches = [collate([data[j] for j in index], 0) for index in sampler.micro_batches(i)]
        result = step(batches, sft_loss, step=i)
        times.append(result.seconds)
        tokens.append(result.tokens)
    peak = peak_rss_bytes()
    _, trainable, total = parameter_bytes(model)
    measured = slice(1, None) if steps > 1 else slice(None)
    speed = sum(tokens[measured]) / sum(times[measured])
    # This machine's matmul speed right after the steps, as `hone advise` measures it: the ratio is what advise's
    # time estimate needs (a paired figure: on a shared machine both move together).
    from honellm.compare.advise import lora_tokens_per_second, measure_matmul_flops

    flops = measure_matmul_flops()
    return {"shape": name, "parameters": total, "trainable_params": trainable, "attention": attention,
            "steps": steps, "build_seconds": round(build_seconds, 1),
            "tokens_per_second": round(speed, 1), "matmul_tflops": round(flops["auto"] / 1e12, 3),
            "advise_tokens_per_second": round(lora_tokens_per_second(ModelShape.of(model.config), flops["auto"]), 1),
            "peak_bytes": peak, "rss_before_steps": before, "estimate_bytes": plan.estimate.total, "estimate": plan.estimate.describe(),
            "error": round(plan.estimate.total / peak - 1, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, from: " + ", ".join(SHAPES))
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per shape (the first is warm-up)")
    parser.add_argument("--estimate-only", action="store_true", help="print the estimates, build nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.steps)), flush=True)
        return
    from honellm.hardware import pick_dtype

    dtype = pick_dtype("auto", "cpu")
    rows = []
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}: choose from {', '.join(SHAPES)}")
        row = shape_estimate(name, attention="eager", compute_dtype=dtype)
        if not args.estimate_only and name not in ESTIMATE_ONLY:
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=False)
            found = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if not found:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name}: the worker failed")
            row |= json.loads(found[-1][7:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'shape':14} {'params':>8} {'LoRA':>7} {'tokens/s':>9} {'peak RSS':>9} {'estimate':>9} {'error':>7}")
    for r in rows:
        peak = f"{r['peak_bytes'] / GiB:.2f} GiB" if "peak_bytes" in r else "-"
        speed = f"{r['tokens_per_second']:.0f}" if "tokens_per_second" in r else "-"
        error = f"{r['error']:+.0%}" if "error" in r else "-"
        print(f"{r['shape']:14} {r['parameters'] / 1e9:7.2f}B {r['trainable_params'] / 1e6:6.1f}M {speed:>9} {peak:>9} "
              f"{r['estimate_bytes'] / GiB:5.2f} GiB {error:>7}")


if __name__ == "__main__":
    main()
