"""Which fast path a model takes, and why not: the one eligibility check every caller asks.

`fast_path_support(model_or_config)` answers for three pieces of speed code:

- `training`: the direct LLaMA-family training forward (`honellm.core.fastpath`), used by SFT, the preference
  and RL recipes and their reference passes (`honellm.training.logprobs`);
- `decoding`: the lean decoding runner (`honellm.core.runners.DecoderRunner`), used by generation, evaluation
  (choice log-likelihoods, generated answers), rollouts and serving;
- `kernels`: the C kernels (`honellm.core.native`) inside those two, in bf16 on a CPU that has them.

A path is taken only where it computes what transformers' own forward computes (the same operations in the same
precision; the tests in tests/unit/test_core_exactness.py hold it to transformers' fp32 results within 1e-4 on
thirteen architectures). Everything this module does not know to be exact steps aside: architectures outside the
LLaMA family (gemma's soft-capping and scaled embeddings, granite's multipliers, olmo2's norms, phi3's fused
projections, GPT-2/NeoX/OPT's learned positions or parallel blocks, mixture-of-experts layers), sliding-window
attention whose window is shorter than the context, rope types whose frequencies change with the sequence
length, tensor-parallel pretraining splits, quantized layers, and (training only) qwen3's q/k norms. Those models
run transformers' forward, which is exact by definition.

`HONE_FAST=0` turns every fast path off (the training forward, the decoding runner, fused LoRA and the kernels);
`HONE_NATIVE=0` the kernels alone; `HONE_FAST_FORWARD=0` the training forward alone. `hone models --check MODEL`
prints the answer; the recipes and `hone eval` write it once into their run log (`note_paths`).

Per-call conditions that change while a model runs (a hook added, a DDP wrapper, dropout in training mode, a
compiled layer, a prompt-learning adapter, the attention kernel a run picked: the training forward computes eager
attention, which Hone's SFT picks on a CPU up to 256 tokens) are checked where the forward runs, in `fastpath.decoder_of` and
`runners.make_runner`; this module answers what holds for the architecture and the loaded modules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from honellm import hardware

# The architectures the fast paths implement: pre-norm decoder layers with Llama's RMSNorm, rotary q/k, attention
# scaled by 1/sqrt(head_dim), a gated MLP, and a plain (unscaled, uncapped) LM head.
DECODING_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TRAINING_TYPES = ("llama", "mistral", "qwen2")  # qwen3's q/k norms are not in the training forward
# Rope types whose cos/sin the model's own `rotary_emb` computes from the positions alone (both paths call it).
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Config fields that change the arithmetic in a way the fast paths do not implement (the value that is harmless).
UNSUPPORTED_FIELDS = {
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "logits_scaling": 1.0,
    "embedding_multiplier": 1.0,
    "residual_multiplier": 1.0,
    "attention_multiplier": None,
    "num_experts": None,
    "num_local_experts": None,
}
PATHS = ("training", "decoding", "kernels")


@dataclass(frozen=True)
class Support:
    """Which fast paths a model takes: `training`, `decoding`, `kernels`, and for each "no" its reason."""

    model_type: str
    training: bool
    decoding: bool
    kernels: bool
    reasons: dict[str, str] = field(default_factory=dict)  # path -> why not (or, for kernels, what runs)

    def path(self, name: str) -> str:
        """One line for a path: "fast" or "transformers (why)"."""
        taken = getattr(self, name)
        if name == "kernels":
            return "native (in bf16)" if taken else f"torch ({self.reasons.get(name, 'off')})"
        if name == "training" and taken:  # the attention kernel is chosen per run (training.setup.pick_attention)
            return "fast (where a run trains with eager attention: on a CPU, sequences up to 256 tokens)"
        return "fast" if taken else f"transformers ({self.reasons.get(name, 'off')})"

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, **{p: getattr(self, p) for p in PATHS},
                "reasons": dict(self.reasons)}

    def summary(self) -> str:
        """One line for a run log: `training fast, decoding transformers (sliding-window attention ...), ...`."""
        return "; ".join(f"{p} {self.path(p)}" for p in PATHS)


def enabled() -> bool:
    """False under `HONE_FAST=0`: every fast path off, transformers' forward and torch's operations everywhere."""
    return hardware.fast_paths_enabled()


def fast_path_support(model_or_config, *, kernels: bool = True) -> Support:
    """Which fast paths `model_or_config` takes (a model, PEFT-wrapped or not, or its config).

    Given a model, the loaded modules are checked too (the decoder layout the fast paths read, accelerate's
    offloading hooks). `kernels=False` skips asking whether the C kernels build
    here (that compiles them on first use): `kernels` is then False with the reason "not checked"."""
    model = None if _is_config(model_or_config) else _unwrap(model_or_config)
    config = text_config(model_or_config)
    model_type = str(getattr(config, "model_type", None))
    reasons: dict[str, str] = {}
    if not enabled():
        reasons = {p: "HONE_FAST=0" for p in PATHS}
        return Support(model_type, False, False, False, reasons)
    layout = layout_problem(model) if model is not None else None
    decoding_problem = architecture_problem(config) or layout
    training_problem = training_config_problem(config) or layout
    if decoding_problem:
        reasons["decoding"] = decoding_problem
    if training_problem:
        reasons["training"] = training_problem
    uses_kernels = False
    if decoding_problem and training_problem:
        reasons["kernels"] = "no fast path to run them in"
    elif not kernels:
        reasons["kernels"] = "not checked"
    else:
        from honellm.core import native

        uses_kernels = native.training_kernels()
        reasons["kernels"] = native.status()  # what runs (bf16 only), or why torch's operations run
    return Support(model_type, training_problem is None, decoding_problem is None, uses_kernels, reasons)


def architecture_problem(config) -> str | None:
    """Why the fast paths do not compute this architecture exactly (None: they do)."""
    if config is None:
        return "no model config"
    model_type = getattr(config, "model_type", None)
    if model_type not in DECODING_TYPES:
        return f"model type {model_type!r} is not one of the LLaMA family the fast paths implement ({', '.join(DECODING_TYPES)})"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        context = getattr(config, "max_position_embeddings", None)
        if context is None or window < context:
            return f"sliding-window attention (a window of {window} tokens, shorter than the context)"
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return f"layer types other than full attention ({sorted(set(layer_types))})"
    for name, harmless in UNSUPPORTED_FIELDS.items():
        value = getattr(config, name, harmless)
        if value is not None and value != harmless:
            return f"{name}={value} is not implemented"
    if getattr(config, "pretraining_tp", 1) != 1:
        return f"pretraining_tp={config.pretraining_tp}"
    rope = rope_type(config)
    if rope not in ROPE_TYPES:
        return f"rope type {rope!r} (its frequencies change with the sequence length; implemented: {', '.join(ROPE_TYPES)})"
    if getattr(config, "quantization_config", None) is not None:
        return "a quantized model (its layers' forward is the quantization library's)"
    return None


def training_config_problem(config) -> str | None:
    """Why the training forward does not compute this model exactly (None: it does). Cheap (a few attribute
    reads): `fastpath.decoder_of` asks it on every forward."""
    problem = architecture_problem(config)
    if problem:
        return problem
    if config.model_type not in TRAINING_TYPES:
        return f"the training forward does not implement {config.model_type}'s q/k norms"
    if os.environ.get("HONE_FAST_FORWARD", "1") == "0":
        return "HONE_FAST_FORWARD=0"
    return None


def layout_problem(model) -> str | None:
    """Why the loaded modules are not the layout the fast paths read (None: they are)."""
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return "accelerate hooks (offloading, device maps) move weights inside the modules' own forward"
    core = getattr(model, "model", None)
    if core is None or not all(hasattr(core, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "not the <Model>ForCausalLM(model=<Model>Model) layout"
    if model.get_output_embeddings() is None:
        return "no output embeddings"
    for layer in core.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(
                hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
            return "a decoder layer without q/k/v/o projections"
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "a decoder layer without a gated MLP"
    return None


# Architectures whose transformers forward ignores packed position ids (tested: the packed loss differs).
PACKING_UNSUPPORTED = {"opt": "OPT computes its learned positions from the attention mask, not the position ids"}


def packing_problem(model_or_config) -> str | None:
    """Why a packed batch (`honellm.training.batching.pack`: sequences end to end in one row, boundaries in the
    position ids) would not compute what the same sequences padded compute (None: it would).

    The forward keeps attention inside each sequence from the position ids: the direct training forward with its
    block-diagonal mask (`fastpath.packed_mask`), transformers' with its own (`masking_utils`' packed-sequence
    masks for eager and sdpa, the varlen kernel under flash attention). Tested equal to the padded loss and
    gradients on every architecture of `honellm.testing.ARCHITECTURES` that this does not rule out. Not a fast
    path of its own (`HONE_FAST=0` keeps it: transformers' forward packs too); `HONE_PACKING=0` turns it off."""
    if os.environ.get("HONE_PACKING", "1") == "0":
        return "HONE_PACKING=0"
    model = None if _is_config(model_or_config) else model_or_config
    if model is not None:
        inner = getattr(model, "module", model)
        peft_config = getattr(inner, "active_peft_config", None)
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            return "a prompt-learning adapter (its virtual tokens go in front of the row, not of each sequence)"
    config = text_config(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in PACKING_UNSUPPORTED:
        return PACKING_UNSUPPORTED[model_type]
    if model is not None:
        import inspect

        forward = getattr(_unwrap(model), "forward", None)
        if forward is not None and "position_ids" not in inspect.signature(forward).parameters:
            return f"{type(_unwrap(model)).__name__}.forward takes no position ids"
    return None


# Model types Liger Kernel patches (its `MODEL_TYPE_TO_APPLY_LIGER_FN`; where Liger is importable, its own table
# is asked too, so a type a newer Liger adds is taken and one an older Liger lacks is not).
LIGER_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
               "phi3", "granite", "olmo2")


def liger_problem(model_or_config, device) -> str | None:
    """Why Liger Kernel's fused kernels (`honellm.core.liger`) do not run for this model here (None: they do):
    they need a CUDA device, the `liger-kernel` package (`pip install 'honellm[gpu]'`) and an architecture Liger
    patches. Liger itself is imported only once the first two hold (never on a CPU: it imports Triton)."""
    import importlib.util

    if not enabled():
        return "HONE_FAST=0"
    if os.environ.get("HONE_LIGER", "1") == "0":
        return "HONE_LIGER=0"
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return "Liger's kernels run on CUDA devices only"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'honellm[gpu]')"
    version = _liger_version()
    if version is not None and version < LIGER_MIN_VERSION:
        return (f"liger-kernel {'.'.join(map(str, version))} is older than "
                f"{'.'.join(map(str, LIGER_MIN_VERSION))}: its fused cross-entropy scales every token's gradient "
                "by the first token's under reduction='none' (pip install -U 'honellm[gpu]')")
    config = text_config(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in LIGER_TYPES or model_type not in _liger_table():
        return f"Liger Kernel does not patch model type {model_type!r}"
    if getattr(config, "quantization_config", None) is not None:
        return "a quantized model (its layers' forward is the quantization library's)"
    return None


def varlen_problem(model_or_config, device, compute_dtype=None) -> str | None:
    """Why `hone_varlen` (`honellm.core.varlen`: torch's own variable-length attention kernel for packed batches)
    does not compute this model's packed attention here (None: it does, once `varlen.self_check` passes): it needs
    a CUDA device, a torch with `varlen_attn` (2.10+), fp16/bf16 compute, and causal attention without
    soft-capping, sinks or dropout (a sliding window needs torch 2.11+)."""
    import torch

    if not enabled():
        return "HONE_FAST=0"
    if os.environ.get("HONE_VARLEN", "1") == "0":
        return "HONE_VARLEN=0"
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return "torch's varlen attention runs on CUDA devices only"
    kernel = varlen_kernel()
    if kernel is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (2.10 or newer does)"
    if compute_dtype is not None and compute_dtype not in (torch.float16, torch.bfloat16):
        return f"torch's varlen attention computes in fp16/bf16, not {compute_dtype} (precision=bf16)"
    config = text_config(model_or_config)
    if getattr(config, "attn_logit_softcapping", None):
        return "soft-capped attention scores (the varlen kernel has no soft-capping)"
    if getattr(config, "model_type", None) == "gpt_oss" or getattr(config, "use_sink", False):
        return "attention sinks (the varlen kernel has none)"
    if getattr(config, "attention_dropout", 0.0):
        return "attention dropout (the varlen kernel has none)"
    if not getattr(config, "is_causal", True):
        return "bidirectional attention"
    if sliding_window(config) and "window_size" not in kernel_parameters(kernel):
        return f"sliding-window attention and torch {torch.__version__}'s varlen kernel has no window (2.11+ has)"
    return None


def varlen_kernel():
    """torch's `varlen_attn` (2.10+), or None on a torch without it. Looked up at each call (`honellm.core.varlen`
    runs what this returns), so a test can stand a reference in for it on a CPU (tests/unit/test_varlen.py)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


# kernel -> its keyword names. A plain dict rather than functools.cache: `honellm.core.varlen` asks inside decoder
# layers that torch.compile traces, and dynamo reads a dict as it is where it traces through a cache wrapper (warning).
KERNEL_PARAMETERS: dict = {}


def kernel_parameters(kernel) -> frozenset[str]:
    """The keyword names a kernel takes (torch's varlen signature changed between releases)."""
    found = KERNEL_PARAMETERS.get(kernel)
    if found is None:
        import inspect

        found = KERNEL_PARAMETERS[kernel] = frozenset(inspect.signature(kernel).parameters)
    return found


def sliding_window(config) -> int | None:
    """The config's sliding-window length where its attention uses one (None: full attention)."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False:
        return int(window)
    return None


# Before 0.8.2, Liger's fused linear cross-entropy with reduction="none" multiplied the precomputed gradients by the
# upstream gradient's first element (`element_mul_kernel` reads one scalar): right for a plain mean, wrong wherever
# tokens carry different weights (DPO's chosen and rejected signs, RL advantages). 0.8.2 folds the per-token
# upstream gradient into each row (`token_grad_output`).
LIGER_MIN_VERSION = (0, 8, 2)


def _liger_version() -> tuple[int, ...] | None:
    """The installed liger-kernel's release numbers (None where its metadata cannot be read: a vendored copy)."""
    import importlib.metadata

    from packaging.version import InvalidVersion, Version

    try:
        text = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return None
    try:
        return Version(text).release[:3]
    except InvalidVersion:
        return ()  # cannot tell whether it has the fix: older than any


def _liger_table() -> tuple[str, ...]:
    """The model types the installed Liger patches (its own table)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return tuple(MODEL_TYPE_TO_APPLY_LIGER_FN)


def rope_type(config) -> str:
    """The config's rope type ("default" when it names none); transformers 5 calls the field rope_parameters."""
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if isinstance(params, dict):
            found = params.get("rope_type", params.get("type"))
            if found is None and params and all(isinstance(v, dict) for v in params.values()):  # per layer type
                kinds = {v.get("rope_type", "default") for v in params.values()}
                return kinds.pop() if len(kinds) == 1 else f"mixed {sorted(kinds)}"
            return str(found or "default")
    return "default"


def note_paths(model, run=None, note=None) -> Support:
    """Say once which paths `model` takes: a `model_paths` event in the run's metrics.jsonl (with the kernels'
    status, so a kernel that fell back to torch is on record) and, with `note` (a monitor's `note`), a line for
    the user. Returns the answer."""
    found = fast_path_support(model)
    if run is not None:
        run.log_metrics(event="model_paths", **found.to_dict())
    if note is not None:
        note(f"model paths: {found.summary()}")
    return found


def text_config(model_or_config):
    """The config the paths read: a model's (under DDP/FSDP and PEFT wrappers) or the config given, and of a
    multimodal one its text part."""
    return _text_config(model_or_config if _is_config(model_or_config)
                        else getattr(_unwrap(model_or_config), "config", None))


def _text_config(config):
    """A multimodal config's text part (the decoder the paths would run)."""
    if config is not None and getattr(config, "model_type", None) not in DECODING_TYPES and hasattr(
            config, "get_text_config"):
        return config.get_text_config()
    return config


def _is_config(obj) -> bool:
    from transformers import PretrainedConfig

    return isinstance(obj, PretrainedConfig)


def decoder_layers(model):
    """The decoder's list of layers (`model.layers` or GPT-2's `h`) under PEFT and DDP/FSDP wrappers, or None."""
    base = _unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", base)
    return getattr(decoder, "layers", None) or getattr(decoder, "h", None)


def compiled(model) -> bool:
    """Whether any decoder layer was compiled in place (`compile=true`: `honellm.training.setup.compile_layers`)."""
    return any(getattr(layer, "_compiled_call_impl", None) is not None for layer in decoder_layers(model) or ())


def _unwrap(model):
    """The causal LM under DDP/FSDP and PEFT wrappers."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def check_paths(name_or_path):
    """Which of Hone's fast paths the model takes and why not (`honellm.core.support.Support`), without loading
    its weights: the modules are built on the meta device from its config, so an 8B model checks in a second."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from honellm.errors import HoneError
    from honellm.models import resolve

    resolved = resolve(name_or_path)
    config = AutoConfig.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as error:
        raise HoneError(f"{resolved.name} is not a causal language model transformers can build ({error})",
                        fix="pass a decoder-only model (`hone models` lists the ones here)") from error
    return fast_path_support(model)
