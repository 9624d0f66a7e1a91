"""Which modules an adapter goes into, by architecture.

`all-linear` (the default of the LoRA family) adapts every projection of attention and MLP, which the QLoRA paper
found necessary to match full fine-tuning; `attention` adapts the attention projections only (the original LoRA
setup). Names are given explicitly for the architectures below, so that an adapter's config lists them (vLLM
and other loaders read that list); other architectures fall back to PEFT's own `all-linear` search (every
linear layer but the output head).
"""

from __future__ import annotations

from honellm.errors import HoneError

_LLAMA = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}

TARGETS: dict[str, dict[str, list[str]]] = {
    **{name: _LLAMA for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo",
                                 "olmo2", "granite", "smollm3", "cohere")},
    "phi3": {"attention": ["qkv_proj", "o_proj"], "mlp": ["gate_up_proj", "down_proj"]},
    "phi": {"attention": ["q_proj", "k_proj", "v_proj", "dense"], "mlp": ["fc1", "fc2"]},
    "gpt2": {"attention": ["c_attn", "attn.c_proj"], "mlp": ["c_fc", "mlp.c_proj"]},
    "gpt_neox": {"attention": ["query_key_value", "dense"], "mlp": ["dense_h_to_4h", "dense_4h_to_h"]},
    "falcon": {"attention": ["query_key_value", "dense"], "mlp": ["dense_h_to_4h", "dense_4h_to_h"]},
    "starcoder2": {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["c_fc", "c_proj"]},
    "opt": {"attention": ["q_proj", "k_proj", "v_proj", "out_proj"], "mlp": ["fc1", "fc2"]},
    "bloom": {"attention": ["query_key_value", "dense"], "mlp": ["dense_h_to_4h", "dense_4h_to_h"]},
}

SPECS = ("all-linear", "attention", "mlp")


def resolve_targets(model_type: str, spec: str | list[str]) -> str | list[str]:
    """Module names for `spec` ("all-linear", "attention", "mlp", or an explicit list) on `model_type`."""
    if isinstance(spec, list):
        return spec
    if spec not in SPECS:
        raise HoneError(f"unknown target_modules {spec!r}", where="target_modules",
                        fix=f"use one of {', '.join(SPECS)}, or a list of module names such as [q_proj, v_proj]")
    known = TARGETS.get(model_type)
    if known is None:
        if spec == "all-linear":
            return "all-linear"  # PEFT finds every linear layer except the output head
        raise HoneError(f"Hone has no {spec} module list for architecture {model_type!r}", where="target_modules",
                        fix="use target_modules=all-linear, or list the module names, e.g. target_modules=[q_proj,v_proj]")
    if spec == "all-linear":
        return [*known["attention"], *known["mlp"]]
    return list(known[spec])
