"""Shared-prefix reuse: few-shot SST-2 classification with and without reusing the prefix's keys and values.

Each prompt is the chat template applied to a system instruction, 8 fixed demonstrations (user review /
assistant label turns) and one query review; the 200 queries come from SST-2 validation and then train (the
demonstrations excluded). Greedy decoding of a few new tokens, as an evaluation run does. For each mode it prints
the wall time, the prompt tokens per second (every prompt token counts, reused or not) and the prefill tokens
actually computed, then checks that both modes give the same tokens. The same comparison follows for choice
scoring (`score_continuations` of " positive" / " negative"). It prints figures; it asserts nothing.

    python bench/bench_prefix_cache.py [--model smollm2-135m-instruct] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
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

SYSTEM = "Classify the sentiment of the movie review as positive or negative."


def read(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def build_prompts(tok, n: int) -> tuple[list[str], str]:
    """`n` few-shot prompts, and the text every one of them starts with (the system turn and the demos)."""
    train = read("train")
    demos = [r for r in train if r["label"] == "positive"][:4] + [r for r in train if r["label"] == "negative"][:4]
    demos = [demos[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]  # alternate labels
    used = {d["text"] for d in demos}
    queries = [r for r in read("validation") + train if r["text"] not in used][:n]
    messages = [{"role": "system", "content": SYSTEM}]
    for d in demos:
        messages += [{"role": "user", "content": f"Review: {d['text']}"}, {"role": "assistant", "content": d["label"]}]
    prompts = [tok.apply_chat_template(messages + [{"role": "user", "content": f"Review: {q['text']}"}],
                                       tokenize=False, add_generation_prompt=True) for q in queries]
    prefix = tok.apply_chat_template(messages, tokenize=False)
    return prompts, prefix


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true", help="40 queries instead of 200")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.quick:
        args.n = 40
    if not DATA.is_dir():
        print(f"skipped: SST-2 not found at {DATA} (the data sets live beside the project)")
        return

    import torch

    from honellm.generation import Generator, SamplingParams
    from honellm.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.model, dtype=args.dtype)
    gen = Generator(model, tok, batch_size=args.batch_size)
    prompts, prefix = build_prompts(tok, args.n)
    lengths = [len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
    shared = gen._shared_length(prompts, [tok(p, add_special_tokens=False).input_ids for p in prompts], "auto",
                                cap=min(lengths) - 1)
    total = sum(lengths)
    print(f"model {args.model} ({next(model.parameters()).dtype}), runner {gen.runner_name}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"{len(prompts)} prompts, {total} prompt tokens (mean {total / len(prompts):.0f}); shared prefix "
          f"{shared} tokens; batch {args.batch_size}; greedy, {args.new_tokens} new tokens\n")

    params = SamplingParams(max_new_tokens=args.new_tokens)
    gen.generate(prompts[:2], params)  # warm-up
    plain, t_plain = timed(lambda: gen.generate(prompts, params))
    reused, t_reused = timed(lambda: gen.generate(prompts, params, shared_prefix="auto"))
    computed_reused = shared + sum(n - shared for n in lengths)
    same = sum(a.token_ids == b.token_ids for a, b in zip(plain, reused, strict=True))
    print(f"{'generate':<24} | {'wall s':>7} | {'prompt tok/s':>12} | {'prefill tokens computed':>23}")
    print(f"{'without prefix reuse':<24} | {t_plain:>7.2f} | {total / t_plain:>12.0f} | {total:>23}")
    print(f"{'with prefix reuse':<24} | {t_reused:>7.2f} | {total / t_reused:>12.0f} | {computed_reused:>23}")
    print(f"speed-up {t_plain / t_reused:.2f}x; identical outputs: {same}/{len(prompts)}")
    labels = [o.text.strip() for o in reused]
    print(f"answers: {sum(a == 'positive' for a in labels)} positive, {sum(a == 'negative' for a in labels)} negative,"
          f" {sum(a not in ('positive', 'negative') for a in labels)} other\n")

    contexts = [p for p in prompts for _ in range(2)]
    choices = ["positive", "negative"] * len(prompts)
    a, t_a = timed(lambda: gen.score_continuations(contexts, choices))
    b, t_b = timed(lambda: gen.score_continuations(contexts, choices, shared_prefix="auto"))
    worst = max(abs(x.logprob_sum - y.logprob_sum) for x, y in zip(a, b, strict=True))
    agree = sum((a[2 * i].logprob_sum > a[2 * i + 1].logprob_sum) == (b[2 * i].logprob_sum > b[2 * i + 1].logprob_sum)
                for i in range(len(prompts)))
    print(f"{'score_continuations':<24} | {'wall s':>7} | {'pairs/s':>12}")
    print(f"{'without prefix reuse':<24} | {t_a:>7.2f} | {len(contexts) / t_a:>12.1f}")
    print(f"{'with prefix reuse':<24} | {t_b:>7.2f} | {len(contexts) / t_b:>12.1f}")
    print(f"speed-up {t_a / t_b:.2f}x; same choice for {agree}/{len(prompts)}; largest log-prob difference "
          f"{worst:.2e} (bf16 rounding of a different batch shape)")


if __name__ == "__main__":
    main()
