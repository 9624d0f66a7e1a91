"""GGUF export fidelity: file size per quantisation and the logits of the GGUF (loaded back by transformers with
`gguf_file=`, which dequantises) against the merged fp32 model, on SST-2-style chat prompts.

    python bench/bench_gguf_export.py ARTIFACT [--out DIR] [--quant f16 --quant q8_0 ...] [--reuse]

ARTIFACT: e.g. the one `hone tune examples/sst2.yaml --method lora max_steps=5 --out runs/sst2-lora` writes.
Both exports run through the real CLI in their own processes, and the comparison loads both with plain
transformers, so nothing of Hone's loading is in the numbers. It prints a markdown table (docs/export.md has one).
Where ../shared/data/sst2 is present it also counts, over the validation reviews, how often the GGUF picks the same
label as the merged model (the larger logit of the labels' first tokens after the chat prompt).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "validation.jsonl"

QUANTS = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0"]
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
    parser.add_argument("--reuse", action="store_true", help="compare the files an earlier run left in --out")
    args = parser.parse_args()
    quants = args.quant or QUANTS
    out = Path(args.out)
    merged, gguf_dir = out / "merged", out / "gguf"
    seconds = None
    if not args.reuse:
        hone("export", args.artifact, "--merged", merged, "--dtype", "fp32", "--force")
        seconds = hone("export", args.artifact, gguf_dir, "--format", "gguf",
                       *[a for q in quants for a in ("--quant", q)], "--force")

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
    labels = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("positive", "negative")]
    records = [json.loads(line) for line in DATA.read_text().splitlines() if line] if DATA.exists() else []
    reviews = [r["text"] for r in records]
    gold = torch.tensor([("positive", "negative").index(r["label"]) for r in records])
    tokenizer.padding_side = "left"
    batch = tokenizer([tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                      {"role": "user", "content": f"Review: {r}"}],
                                                     tokenize=False, add_generation_prompt=True) for r in reviews],
                      return_tensors="pt", padding=True) if reviews else None

    def choices(model):
        if batch is None:
            return None
        with torch.no_grad():
            return model(**batch).logits[:, -1, labels].argmax(-1)

    reference_choices = choices(reference)
    info = json.loads((gguf_dir / "hone-export.json").read_text())
    if seconds is not None:
        print(f"export of {len(quants)} quantisations: {seconds:.0f} s (one merge; wall time on a shared machine)")
    print(f"{len(probes)} prompts, {sum(p.shape[1] for p in probes)} positions; largest |logit| {scale:.1f}; "
          f"{len(reviews)} SST-2 validation reviews for the label agreement")
    if reviews:
        print(f"merged model's accuracy on them: {(reference_choices == gold).float().mean().item():.2f}\n")
    print("| quant | file | max abs logit diff | mean abs diff | same next token (last position) | same label | "
          "same token ids |")
    print("|---|---|---|---|---|---|---|")
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
        picked = choices(model)
        same_label = "-" if picked is None else (f"{int((picked == reference_choices).sum())}/{len(reviews)} "
                                                 f"(accuracy {(picked == gold).float().mean().item():.2f})")
        print(f"| {quant} | {info['files'][quant]['bytes'] / 2**20:.1f} MiB | {max(d.max().item() for d in diffs):.3g} "
              f"| {sum(d.mean().item() for d in diffs) / len(diffs):.3g} | {same_next}/{len(probes)} | {same_label} "
              f"| {same_ids} |",
              flush=True)
        del model


if __name__ == "__main__":
    main()
