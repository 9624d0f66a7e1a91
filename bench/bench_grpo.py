"""Where a GRPO step's time goes: generating the rollouts, scoring them, and training on them.

Runs Hone's GRPO recipe for a few steps on the built-in `arithmetic` task (the embedded SmolLM2-135M by default)
and reads its metrics.jsonl: per step, the seconds and tokens/s of each phase, and the share spent generating.

- generation: `group_size` completions for each of `prompts_per_step` prompts through the `Generator` (KV cache,
  the system prompt's keys and values computed once; vLLM on a CUDA GPU where installed). tokens/s counts generated
  tokens.
- scoring: the task's reward functions.
- training: the reference log-probs (the adapter disabled, no grad) and the update (forward + backward + AdamW);
  tokens/s counts prompt + completion tokens forwarded in the update.

It prints figures; it asserts nothing. On a shared machine the numbers move a lot from run to run: run it alone.

    python bench/bench_grpo.py [--model smollm2-135m-instruct] [--steps 3] [--prompts 4] [--group 8]
                               [--max-new-tokens 48] [--attention auto|eager|sdpa] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model (default: the task's, the embedded SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps to time (the first is reported apart)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="longest completion")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per training micro-batch")
    parser.add_argument("--kl-coef", type=float, default=0.04, help="0 skips the reference forward")
    parser.add_argument("--attention", default="auto", choices=["auto", "eager", "sdpa"],
                        help="attention kernel of the training forward (auto: eager on CPU up to 256 tokens)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("HONE_QUIET", "1")

    from honellm.reward.recipes.grpo import GRPOConfig, grpo
    from honellm.task import Task

    overrides = [f"model={args.model}"] if args.model else []
    task = Task.load("arithmetic", overrides)
    config = GRPOConfig(max_steps=args.steps, prompts_per_step=args.prompts, group_size=args.group,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, kl_coef=args.kl_coef,
                        attention=args.attention, eval_every=0, save_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "run"
        started = time.perf_counter()
        artifact = grpo(task, config, out=out, force=True)
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = next(r for r in rows if r.get("event") == "start")
    steps = [r for r in rows if r.get("kind") == "train"]
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"GRPO on arithmetic, {task.config.model}: {args.prompts} prompts x {args.group} completions per step, "
          f"up to {args.max_new_tokens} new tokens; {start['precision']} on {device}, "
          f"{torch.get_num_threads()} threads, generation backend {start['generation_backend']}")
    header = (f"{'step':>4} | {'gen s':>6} | {'gen tok/s':>9} | {'score s':>7} | {'ref s':>6} | {'update s':>8} | "
              f"{'train tok/s':>11} | {'gen share':>9} | {'len':>5} | {'reward':>6}")
    print(header)
    print("-" * len(header))
    for r in steps:
        update = r["training_seconds"] - r["reference_seconds"]
        print(f"{r['step']:>4} | {r['generation_seconds']:>6.1f} | {r['generation_tokens_per_second']:>9.1f} | "
              f"{r['scoring_seconds']:>7.3f} | {r['reference_seconds']:>6.1f} | {update:>8.1f} | "
              f"{r['training_tokens_per_second']:>11.1f} | {100 * r['generation_share']:>8.1f}% | "
              f"{r['completion_length']:>5.1f} | {r['reward']:>6.3f}")
    later = steps[1:] or steps
    share = statistics.mean(r["generation_share"] for r in later)
    print(f"mean over steps {later[0]['step']}-{later[-1]['step']}: {100 * share:.1f}% of a step generating; "
          f"generation {statistics.mean(r['generation_tokens_per_second'] for r in later):.1f} tok/s, "
          f"training {statistics.mean(r['training_tokens_per_second'] for r in later):.1f} tok/s; "
          f"wall {wall:.0f} s for {len(steps)} steps (model load included)")
    print(json.dumps({"generation_share": round(share, 4), "cost": artifact.manifest.cost}))


if __name__ == "__main__":
    main()
