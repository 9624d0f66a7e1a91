"""The model core: every piece of speed code, and the one check that says where it applies.

- `support`: `fast_path_support(model)`, which of the paths below a model takes and why not (one answer, asked by
  training, evaluation, generation and serving; `hone models --check MODEL` prints it). `HONE_FAST=0` turns every
  fast path off; `HONE_NATIVE=0` the C kernels alone.
- `fastpath`: the direct LLaMA-family training forward (transformers' arithmetic without its per-call machinery).
- `fused`: grouped and fused LoRA products for training.
- `runners`: the decoding runners of the generation engine (the lean LLaMA-family one, and transformers' own).
- `native`: the C kernels (sources in `csrc/`), built on first use, with torch's operations wherever they do not run.

Everywhere a fast path is not provably exact, transformers' own forward runs.
"""
