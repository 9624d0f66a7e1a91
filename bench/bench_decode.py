"""Decode speed: Hone's generation engine against `model.generate` on the same prompts and settings.

Both sides sample (temperature 0.7, top-p 0.9, top-k 50) 64 new tokens from bf16 weights (on a CPU with fast
bf16; the hardware policy's dtype elsewhere), at batch 1 and batch 16, from chat prompts built on SST-2 reviews.
Throughput counts the tokens each side really produced (up to and including EOS) over the wall time of the call,
prefill included. Runs alternate between the two sides, `--repeats` pairs of them: the table shows the best run
of each side and, as the headline ratio, the median over pairs of (Hone / generate) for runs made back to back,
which cancels most of the slow phases of a shared machine (its speed drifts by up to 2x over tens of seconds).
It prints figures; it asserts nothing.

    python bench/bench_decode.py [--model smollm2-135m-instruct] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The data sets live beside the project (../shared/data); from a git worktree one level deeper, too; HONE_BENCH_DATA
# names the folder elsewhere (e.g. a GPU machine without ../shared/data).
CANDIDATES = [Path(p) for p in [os.environ.get("HONE_BENCH_DATA")] if p] + [ROOT.parent / "shared" / "data",
                                                                           ROOT.parent.parent / "shared" / "data"]
DATA = next((c for c in CANDIDATES if c.is_dir()), CANDIDATES[0]) / "sst2"
sys.path.insert(0, str(ROOT))


def load_reviews(n: int) -> list[str]:
    rows = [json.loads(line) for line in (DATA / "validation.jsonl").read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows[:n]]


def hf_generate(model, tok, prompts, args):
    import torch

    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = set(Generator_eos(model, tok))
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=True, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, pad_token_id=tok.pad_token_id)
    seconds = time.perf_counter() - start
    produced = 0
    for row in out[:, enc.input_ids.shape[1]:].tolist():
        n = 0
        for t in row:
            n += 1
            if t in eos:
                break
        produced += n
    return produced, seconds


def Generator_eos(model, tok):  # noqa: N802 - mirrors the engine's rule for what ends a turn
    from honellm.generation import eos_token_ids

    return eos_token_ids(model, tok)


def hone_generate(gen, prompts, args):
    from honellm.generation import SamplingParams

    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=0)
    start = time.perf_counter()
    outs = gen.generate(prompts, params)
    seconds = time.perf_counter() - start
    return sum(o.completion_tokens for o in outs), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true", help="16 new tokens, one run per side")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="alternating pairs of runs per batch size")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0: torch's default)")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = 16, 1
    if not DATA.is_dir():
        print(f"skipped: SST-2 not found at {DATA} (the data sets live beside the project)")
        return

    import torch

    from honellm.generation import Generator
    from honellm.models import load

    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load(args.model, dtype=args.dtype)
    tok.padding_side = "left"
    gen = Generator(model, tok, batch_size=max(int(b) for b in args.batch_sizes.split(",")))
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write a long story inspired by this movie "
                                         f"review: {text}"}], tokenize=False, add_generation_prompt=True)
               for text in load_reviews(64)]
    print(f"model {args.model} ({next(model.parameters()).dtype}), engine runner: {gen.runner_name}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    from honellm.core import native

    print(f"engine products: {native.status()}")
    print(f"sampling: temperature {args.temperature}, top-p {args.top_p}, top-k {args.top_k}, "
          f"{args.new_tokens} new tokens; {args.repeats} alternating pairs of runs\n")
    print(f"{'batch':>5} | {'generate tok/s (best)':>21} | {'hone tok/s (best)':>17} | {'ratio of bests':>14} | "
          f"{'paired ratio, median [min, max]':>31} | tokens (generate / hone)")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        chosen = prompts[:batch]
        hf_generate(model, tok, chosen, argparse.Namespace(**{**vars(args), "new_tokens": 4}))  # warm-up
        hone_generate(gen, chosen, argparse.Namespace(**{**vars(args), "new_tokens": 4}))
        best_hf = best_hone = 0.0
        counts = (0, 0)
        ratios = []
        for _ in range(args.repeats):
            n_hf, s_hf = hf_generate(model, tok, chosen, args)
            n_hone, s_hone = hone_generate(gen, chosen, args)
            best_hf, best_hone = max(best_hf, n_hf / s_hf), max(best_hone, n_hone / s_hone)
            ratios.append((n_hone / s_hone) / (n_hf / s_hf))
            counts = (n_hf, n_hone)
        ratios.sort()
        paired = f"{statistics.median(ratios):.2f}x [{ratios[0]:.2f}, {ratios[-1]:.2f}]"
        print(f"{batch:>5} | {best_hf:>21.1f} | {best_hone:>17.1f} | {best_hone / best_hf:>13.2f}x | {paired:>31} | "
              f"{counts[0]} / {counts[1]}", flush=True)


if __name__ == "__main__":
    main()
