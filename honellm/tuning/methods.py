"""The tuning methods: one config (every field with a default and a description) and one `apply` each,
registered in one line beside their definition.

| method | what trains | paper |
|---|---|---|
| lora | low-rank update B·A of each target matrix | Hu et al. 2021, https://arxiv.org/abs/2106.09685 |
| rslora | LoRA scaled by alpha/sqrt(r) instead of alpha/r (stable at high rank) | Kalajdzievski 2023, https://arxiv.org/abs/2312.03732 |
| dora | LoRA on the direction of each weight, plus a trained magnitude | Liu et al. 2024, https://arxiv.org/abs/2402.09353 |
| pissa | LoRA initialised on the principal singular directions (base keeps the residual) | Meng et al. 2024, https://arxiv.org/abs/2404.02948 |
| olora | LoRA initialised by a QR decomposition of the weights | Büyükakyüz 2024, https://arxiv.org/abs/2406.01775 |
| qlora | LoRA on a 4-bit NF4-quantised base (CUDA only) | Dettmers et al. 2023, https://arxiv.org/abs/2305.14314 |
| ia3 | learned rescaling vectors of keys, values and MLP activations | Liu et al. 2022, https://arxiv.org/abs/2205.05638 |
| prefix_tuning | learned key/value prefixes at every layer | Li & Liang 2021, https://arxiv.org/abs/2101.00190 |
| prompt_tuning | learned soft-prompt embeddings before the input | Lester et al. 2021, https://arxiv.org/abs/2104.08691 |
| p_tuning | soft prompts produced by a small MLP encoder | Liu et al. 2021, https://arxiv.org/abs/2103.10385 |
| loha | low-rank Hadamard product update | Hyeon-Woo et al. 2021, https://arxiv.org/abs/2108.06098 |
| lokr | Kronecker-product update | Yeh et al. 2023, https://arxiv.org/abs/2309.14859 |
| full | every weight | - |

Learning-rate defaults follow each paper's recommendations for models of this size (adapters with few parameters
need larger steps: IA3 and soft prompts train at 1e-2-scale rates, full fine-tuning at 1e-5-scale rates).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from honellm.errors import HoneError, MissingDependency
from honellm.tuning.config import SFTConfig
from honellm.tuning.registry import TuningMethod, register_method
from honellm.tuning.targets import ia3_targets, is_moe, resolve_targets

TargetSpec = str | list[str]
TARGETS_HELP = "modules to adapt: all-linear, attention, mlp, or a list of module names"


def _model_type(model) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or ""


def _refuse_conv1d(model, method: str) -> None:
    """GPT-2-style models store their projections as transformers' Conv1D (a transposed linear layer); PEFT's
    LoHa and LoKr have no Conv1D layer and OLoRA's QR initialisation gets the transposed shape wrong."""
    from transformers.pytorch_utils import Conv1D

    if any(isinstance(module, Conv1D) for module in model.modules()):
        raise HoneError(f"{method} cannot adapt {_model_type(model)}'s Conv1D projection layers (PEFT does not "
                        "support them for this method)", where=f"--method {method}",
                        fix="use --method lora, rslora, dora or pissa, which adapt Conv1D layers")


def _peft(model, peft_config):
    from peft import get_peft_model

    # Keep the adapter's own dtype decisions to `Precision.cast_model` (trainable weights in fp32).
    return get_peft_model(model, peft_config, autocast_adapter_dtype=False)


# ------------------------------------------------------------------------------------------------ LoRA family


class LoraConfig(SFTConfig):
    r: int = Field(16, ge=1, description="rank of the update")
    alpha: float = Field(32, gt=0, description="scale: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input (0 is fastest)")
    target_modules: TargetSpec = Field("all-linear", description=TARGETS_HELP)


def _lora(model, config: LoraConfig, **variant):
    from peft import LoraConfig as PeftLoraConfig

    targets = resolve_targets(_model_type(model), config.target_modules)
    if targets == "all-linear" and is_moe(_model_type(model)) and (variant.get("use_dora") or "init_lora_weights" in variant):
        name = "dora" if variant.get("use_dora") else str(variant["init_lora_weights"]).split("_")[0]
        raise HoneError(f"{name} cannot adapt {_model_type(model)}'s experts: they are fused parameters, and PEFT "
                        f"supports only plain LoRA on parameters", where="target_modules",
                        fix=f"use {name} with target_modules=attention, or --method lora to adapt the experts too")
    return _peft(model, PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                       target_modules=targets, task_type="CAUSAL_LM", **variant))


def apply_lora(model, config: LoraConfig, base_path: str):
    return _lora(model, config)


register_method(TuningMethod("lora", LoraConfig, apply_lora, "low-rank adapters on every linear layer",
                             "https://arxiv.org/abs/2106.09685"))


class RsLoraConfig(LoraConfig):
    alpha: float = Field(16, gt=0, description="scale: the update is multiplied by alpha / sqrt(r)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate of AdamW")


def apply_rslora(model, config: RsLoraConfig, base_path: str):
    return _lora(model, config, use_rslora=True)


register_method(TuningMethod("rslora", RsLoraConfig, apply_rslora, "LoRA with rank-stabilised scaling alpha/sqrt(r)",
                             "https://arxiv.org/abs/2312.03732"))


class DoraConfig(LoraConfig):
    pass


def apply_dora(model, config: DoraConfig, base_path: str):
    return _lora(model, config, use_dora=True)


register_method(TuningMethod("dora", DoraConfig, apply_dora, "weight-decomposed LoRA: direction by LoRA, magnitude trained",
                             "https://arxiv.org/abs/2402.09353"))


def save_converted_adapter(model, folder: Path, *, initial: Path | None = None, state_dict: dict | None = None) -> None:
    """Save a PiSSA/OLoRA adapter converted to a plain LoRA of rank 2r that applies to the ORIGINAL base weights
    (these methods subtract their initial adapter from the base; the artifact keeps the base untouched)."""
    if initial is None:
        raise ValueError("this method needs the adapter saved right after initialisation")
    model.save_pretrained(folder, safe_serialization=True, path_initial_model_for_weight_conversion=str(initial),
                          state_dict=state_dict)


def save_initial_adapter(model, folder: Path) -> None:
    """The adapter as initialised, before training (what PiSSA/OLoRA conversion subtracts)."""
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True  # saved as a plain LoRA, so that loading it does not re-run the SVD
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        config.init_lora_weights = init


class PissaConfig(LoraConfig):
    alpha: float = Field(16, gt=0, description="scale alpha / r; PiSSA uses alpha = r so the init reproduces the weights")
    r: int = Field(16, ge=1, description="rank of the update (and of the principal part moved into the adapter)")
    svd_iterations: int = Field(4, ge=0, description="subspace iterations of the fast randomised SVD (0: exact SVD, slow)")
    lr: float = Field(5e-5, gt=0, description="peak learning rate of AdamW (PiSSA starts on the principal directions: smaller steps)")


def apply_pissa(model, config: PissaConfig, base_path: str):
    init = f"pissa_niter_{config.svd_iterations}" if config.svd_iterations else "pissa"
    return _lora(model, config, init_lora_weights=init)


register_method(TuningMethod("pissa", PissaConfig, apply_pissa, "LoRA initialised on the principal singular directions",
                             "https://arxiv.org/abs/2404.02948", save=save_converted_adapter, initial_adapter=True))


class OloraConfig(LoraConfig):
    alpha: float = Field(16, gt=0, description="scale: the update is multiplied by alpha / r")
    lr: float = Field(5e-5, gt=0, description="peak learning rate of AdamW")


def apply_olora(model, config: OloraConfig, base_path: str):
    _refuse_conv1d(model, "olora")
    return _lora(model, config, init_lora_weights="olora")


register_method(TuningMethod("olora", OloraConfig, apply_olora, "LoRA initialised by a QR decomposition of the weights",
                             "https://arxiv.org/abs/2406.01775", save=save_converted_adapter, initial_adapter=True))


class QLoraConfig(LoraConfig):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base")
    double_quant: bool = Field(True, description="quantise the quantisation constants too (saves ~0.4 bit per weight)")


def load_qlora(name_or_path: str, config: QLoraConfig, device):
    """The base model quantised to 4 bits by bitsandbytes (CUDA only)."""
    if torch.device(device).type != "cuda":
        raise HoneError("qlora needs a CUDA GPU: bitsandbytes 4-bit layers run on CUDA only", where="--method qlora",
                        fix="use --method lora on this machine (bf16 LoRA), or run on a machine with a GPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise MissingDependency("qlora needs the bitsandbytes package", fix="pip install bitsandbytes") from None
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from honellm.models import load_tokenizer, resolve

    resolved = resolve(name_or_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.quant_type,
                               bnb_4bit_use_double_quant=config.double_quant, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": torch.device(device).index or 0})
    model.config.hone_model_id = resolved.name
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    return model, load_tokenizer(name_or_path)


def apply_qlora(model, config: QLoraConfig, base_path: str):
    return _lora(model, config)


register_method(TuningMethod("qlora", QLoraConfig, apply_qlora, "LoRA on a 4-bit quantised base (CUDA + bitsandbytes)",
                             "https://arxiv.org/abs/2305.14314", needs_gpu=True, load=load_qlora))


# ------------------------------------------------------------------------------------------------ IA3


class IA3Config(SFTConfig):
    target_modules: list[str] | None = Field(
        None, description="modules whose output (or input, for feed-forward ones) is rescaled; None: PEFT's choice "
                          "for the architecture (keys, values and the MLP's down projection for Llama)")
    feedforward_modules: list[str] | None = Field(
        None, description="which of target_modules are feed-forward (rescaled at the input); None: PEFT's choice")
    lr: float = Field(3e-3, gt=0, description="peak learning rate of AdamW (IA3 trains few parameters: large steps)")


def apply_ia3(model, config: IA3Config, base_path: str):
    from peft import IA3Config as PeftIA3Config

    targets, feedforward = config.target_modules, config.feedforward_modules
    if targets is None:  # PEFT's choice where it has one, else Hone's table (keys, values, MLP output)
        targets, known_feedforward = ia3_targets(_model_type(model))
        feedforward = feedforward if feedforward is not None else known_feedforward
    try:
        peft_config = PeftIA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")
        return _peft(model, peft_config)
    except ValueError as err:
        raise HoneError(f"IA3 cannot find its modules in this model: {err}", where="target_modules",
                        fix="give target_modules and feedforward_modules explicitly") from None


register_method(TuningMethod("ia3", IA3Config, apply_ia3, "learned rescaling of keys, values and MLP activations",
                             "https://arxiv.org/abs/2205.05638"))


# ------------------------------------------------------------------------------------------------ prompt learning


class PrefixTuningConfig(SFTConfig):
    num_virtual_tokens: int = Field(20, ge=1, description="length of the learned key/value prefix at every layer")
    projection: bool = Field(False, description="produce the prefix with a 2-layer MLP (the paper's reparametrisation)")
    encoder_hidden_size: int = Field(256, ge=1, description="hidden size of the projection MLP")
    lr: float = Field(1e-2, gt=0, description="peak learning rate of AdamW")


def apply_prefix_tuning(model, config: PrefixTuningConfig, base_path: str):
    from peft import PrefixTuningConfig as PeftPrefixConfig

    return _peft(model, PeftPrefixConfig(num_virtual_tokens=config.num_virtual_tokens,
                                         prefix_projection=config.projection,
                                         encoder_hidden_size=config.encoder_hidden_size, task_type="CAUSAL_LM"))


register_method(TuningMethod("prefix_tuning", PrefixTuningConfig, apply_prefix_tuning,
                             "learned key/value prefixes at every layer", "https://arxiv.org/abs/2101.00190",
                             merges=False))


class PromptTuningConfig(SFTConfig):
    num_virtual_tokens: int = Field(20, ge=1, description="number of soft-prompt embeddings before the input")
    init_text: str | None = Field(
        None, description="initialise the soft prompt from this text's token embeddings (None: random init)")
    lr: float = Field(3e-2, gt=0, description="peak learning rate of AdamW (soft prompts need large steps)")


def apply_prompt_tuning(model, config: PromptTuningConfig, base_path: str):
    from peft import PromptTuningConfig as PeftPromptConfig

    if config.init_text:
        peft_config = PeftPromptConfig(num_virtual_tokens=config.num_virtual_tokens, prompt_tuning_init="TEXT",
                                       prompt_tuning_init_text=config.init_text, tokenizer_name_or_path=base_path,
                                       task_type="CAUSAL_LM")
    else:
        peft_config = PeftPromptConfig(num_virtual_tokens=config.num_virtual_tokens, task_type="CAUSAL_LM")
    return _peft(model, peft_config)


register_method(TuningMethod("prompt_tuning", PromptTuningConfig, apply_prompt_tuning,
                             "learned soft-prompt embeddings before the input", "https://arxiv.org/abs/2104.08691",
                             merges=False))


class PTuningConfig(SFTConfig):
    num_virtual_tokens: int = Field(20, ge=1, description="number of soft-prompt embeddings before the input")
    encoder_hidden_size: int = Field(128, ge=1, description="hidden size of the prompt encoder MLP")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of AdamW")


def apply_p_tuning(model, config: PTuningConfig, base_path: str):
    from peft import PromptEncoderConfig

    return _peft(model, PromptEncoderConfig(num_virtual_tokens=config.num_virtual_tokens,
                                            encoder_hidden_size=config.encoder_hidden_size,
                                            encoder_reparameterization_type="MLP", task_type="CAUSAL_LM"))


register_method(TuningMethod("p_tuning", PTuningConfig, apply_p_tuning, "soft prompts produced by a small MLP encoder",
                             "https://arxiv.org/abs/2103.10385", merges=False))


# ------------------------------------------------------------------------------------------------ LyCORIS


class LoHaConfig(SFTConfig):
    r: int = Field(8, ge=1, description="rank of each of the two Hadamard factors")
    alpha: float = Field(8, gt=0, description="scale: the update is multiplied by alpha / r")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="probability of skipping an adapted module in a step")
    target_modules: TargetSpec = Field("all-linear", description=TARGETS_HELP)
    lr: float = Field(2e-4, gt=0, description="peak learning rate of AdamW")


def apply_loha(model, config: LoHaConfig, base_path: str):
    from peft import LoHaConfig as PeftLoHaConfig

    _refuse_conv1d(model, "loha")
    targets = resolve_targets(_model_type(model), config.target_modules)
    return _peft(model, PeftLoHaConfig(r=config.r, alpha=config.alpha, module_dropout=config.module_dropout,
                                       target_modules=targets, task_type="CAUSAL_LM"))


register_method(TuningMethod("loha", LoHaConfig, apply_loha, "low-rank Hadamard-product update",
                             "https://arxiv.org/abs/2108.06098"))


class LoKrConfig(SFTConfig):
    r: int = Field(8, ge=1, description="rank of the low-rank Kronecker factor")
    alpha: float = Field(8, gt=0, description="scale: the update is multiplied by alpha / r")
    decompose_both: bool = Field(False, description="decompose the left Kronecker factor too")
    target_modules: TargetSpec = Field("all-linear", description=TARGETS_HELP)
    lr: float = Field(2e-4, gt=0, description="peak learning rate of AdamW")


def apply_lokr(model, config: LoKrConfig, base_path: str):
    from peft import LoKrConfig as PeftLoKrConfig

    _refuse_conv1d(model, "lokr")
    targets = resolve_targets(_model_type(model), config.target_modules)
    return _peft(model, PeftLoKrConfig(r=config.r, alpha=config.alpha, decompose_both=config.decompose_both,
                                       target_modules=targets, task_type="CAUSAL_LM"))


register_method(TuningMethod("lokr", LoKrConfig, apply_lokr, "Kronecker-product update",
                             "https://arxiv.org/abs/2309.14859"))


# ------------------------------------------------------------------------------------------------ full


class FullConfig(SFTConfig):
    lr: float = Field(2e-5, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay (matrices only)")


def apply_full(model, config: FullConfig, base_path: str):
    for param in model.parameters():
        param.requires_grad_(param.is_floating_point())
    return model


register_method(TuningMethod("full", FullConfig, apply_full, "every weight (fp32 master weights, bf16 compute)",
                             merges=False, trains_base=True))
