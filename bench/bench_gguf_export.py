"""GGUF export fidelity: file size per quantisation and the logits of the GGUF (loaded back by transformers with
`gguf_file=`, which dequantises) against the merged fp32 model, on SST-2-style chat prompts.

    python bench/bench_gguf_export.py ARTIFACT [--out DIR] [--quant f16 --quant q8_0 ...]

ARTIFACT: e.g. the one `hone tune examples/sst2.yaml --method lora max_steps=5 --out runs/sst2-lora` writes.
Both exports run through the real CLI in their own processes, and the comparison loads both with plain
transformers, so nothing of Hone's loading is in the numbers. It prints a markdown table (docs/export.md has one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

QUANTS = ["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
REVIEWS = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés from start to finish,",
           "it's a charming and often affecting journey.", "unflinchingly bleak and desperate"]
SYSTEM = "Classify the sentiment of the movie review as positive or negative. Answer with one word."


def hone(*args) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "honellm", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"hone {' '.join(map(str, args))} failed:\n{done.stderr}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--out", default="runs/bench-gguf")
    parser.add_argument("--quant", action="append", help=f"default: {' '.join(QUANTS)}")
    args = parser.parse_args()
    quants = args.quant or QUANTS
    out = Path(args.out)
    merged, gguf_dir = out / "merged", out / "gguf"
    hone("export", args.artifact, "--merged", merged, "--dtype", "fp32", "--force")
    seconds = hone("export", args.artifact, gguf_dir, "--format", "gguf", *[a for q in quants for a in ("--quant", q)],
                   "--force")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    texts = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": f"Review: {r}"}],
                                           tokenize=False, add_generation_prompt=True) for r in REVIEWS]
    probes = [tokenizer(t, return_tensors="pt")["input_ids"] for t in texts]
    with torch.no_grad():
        expected = [reference(ids).logits[0] for ids in probes]
    scale = max(e.abs().max().item() for e in expected)
    info = json.loads((gguf_dir / "hone-export.json").read_text())
    print(f"export of {len(quants)} quantisations: {seconds:.0f} s (one merge; wall time on a shared machine)")
    print(f"{len(probes)} prompts, {sum(p.shape[1] for p in probes)} positions; largest |logit| {scale:.1f}\n")
    print("| quant | file | max abs logit diff | mean abs diff | same next token (last position) | same token ids |")
    print("|---|---|---|---|---|---|")
    samples = texts + ["The quick brown fox jumps over 123 lazy dogs!\n  Ünïcödé 🎉 <|im_end|>"]
    for quant in quants:
        name = info["files"][quant]["file"]
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32).eval()
        loaded = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
        same_ids = all(loaded(t)["input_ids"] == tokenizer(t)["input_ids"] for t in samples)
        with torch.no_grad():
            got = [model(ids).logits[0] for ids in probes]
        diffs = [(g - e).abs() for g, e in zip(got, expected, strict=True)]
        same_next = sum(int(g[-1].argmax() == e[-1].argmax()) for g, e in zip(got, expected, strict=True))
        print(f"| {quant} | {info['files'][quant]['bytes'] / 2**20:.1f} MiB | {max(d.max().item() for d in diffs):.3g} "
              f"| {sum(d.mean().item() for d in diffs) / len(diffs):.3g} | {same_next}/{len(probes)} | {same_ids} |",
              flush=True)
        del model


if __name__ == "__main__":
    main()
