"""Which modules an adapter goes into, by architecture.

`all-linear` (the default of the LoRA family) adapts every projection of attention and MLP, which the QLoRA paper
found necessary to match full fine-tuning; `attention` adapts the attention projections only (the original LoRA
setup). Names are given explicitly for the architectures below, so that an adapter's config lists them (vLLM
and other loaders read that list); other architectures fall back to PEFT's own `all-linear` search (every
linear layer but the output head).

Mixture-of-experts models (qwen3_moe, mixtral, ...) keep their experts as fused 3-D parameters, not linear layers:
`all-linear` there is PEFT's own search, which adapts the attention projections as modules and, through PEFT's
transformers weight conversion, the experts' (and router's) parameters as `target_parameters`. Only plain LoRA
(and rsLoRA) can adapt parameters; the other methods get a clear error naming what to do instead.

IA3 needs to know which modules are feed-forward; PEFT knows it for some architectures only, so `IA3_TARGETS`
gives the rest (keys, values and the MLP's output projection, as the paper does for T5).
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

# Mixture-of-experts: attention projections are linear layers; the experts are fused parameters (see above).
_MOE_ATTENTION = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"]}
MOE: dict[str, dict[str, list[str]]] = {name: _MOE_ATTENTION for name in ("qwen3_moe", "qwen2_moe", "mixtral",
                                                                          "olmoe", "granitemoe")}

# (target_modules, feedforward_modules) of IA3 where PEFT has no default for the architecture.
IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    **{name: (["k_proj", "v_proj", "down_proj"], ["down_proj"]) for name in ("olmo", "olmo2", "granite", "smollm3",
                                                                             "cohere")},
    "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
    **{name: (["k_proj", "v_proj"], []) for name in MOE},  # the experts are parameters: IA3 cannot rescale them
}

SPECS = ("all-linear", "attention", "mlp")


def resolve_targets(model_type: str, spec: str | list[str]) -> str | list[str]:
    """Module names for `spec` ("all-linear", "attention", "mlp", or an explicit list) on `model_type`."""
    if isinstance(spec, list):
        return spec
    if spec not in SPECS:
        raise HoneError(f"unknown target_modules {spec!r}", where="target_modules",
                        fix=f"use one of {', '.join(SPECS)}, or a list of module names such as [q_proj, v_proj]")
    if model_type in MOE:
        if spec == "all-linear":
            return "all-linear"  # PEFT adapts the attention layers and the experts' parameters
        if spec == "attention":
            return list(MOE[model_type]["attention"])
        raise HoneError(f"{model_type} keeps its experts as fused parameters, not linear layers: there is no mlp "
                        "module list", where="target_modules",
                        fix="use target_modules=all-linear (LoRA adapts the experts' parameters) or attention")
    known = TARGETS.get(model_type)
    if known is None:
        if spec == "all-linear":
            return "all-linear"  # PEFT finds every linear layer except the output head
        raise HoneError(f"Hone has no {spec} module list for architecture {model_type!r}", where="target_modules",
                        fix="use target_modules=all-linear, or list the module names, e.g. target_modules=[q_proj,v_proj]")
    if spec == "all-linear":
        return [*known["attention"], *known["mlp"]]
    return list(known[spec])


def is_moe(model_type: str) -> bool:
    return model_type in MOE


def ia3_targets(model_type: str) -> tuple[list[str], list[str]] | tuple[None, None]:
    """IA3's (target_modules, feedforward_modules) for `model_type`; (None, None) lets PEFT choose."""
    return IA3_TARGETS.get(model_type, (None, None))
