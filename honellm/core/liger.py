"""Liger Kernel's fused Triton kernels on CUDA: fused linear cross-entropy, RMSNorm, SwiGLU and rotary.

Hone does not write its own GPU kernels: where `honellm.core.support.liger_problem` says yes (a CUDA device,
the `liger-kernel` package installed — `pip install 'honellm[gpu]'` — and an architecture Liger patches),
`apply` hands the loaded model to Liger's own API (`liger_kernel.transformers._apply_liger_kernel_to_instance`,
the instance form of `apply_liger_kernel_to_<arch>`) for its RMSNorm, SwiGLU MLP and rotary embedding, and
`honellm.training.logprobs` computes the target tokens' log-probs with `LigerFusedLinearCrossEntropyLoss`
(reduction "none"): the LM head and the log-softmax in one chunked kernel, so the [tokens x vocabulary] logits are
never materialised (SmolLM2's 49,152-entry vocabulary: ~200 KB per token in fp32, and its gradient). The SFT loss
and the per-token and per-sequence log-probs of the preference and RL recipes all go through that one function.

Liger's kernels compute the same functions as transformers' modules within their own tested tolerances (they
are not bit-for-bit transformers'); `HONE_LIGER=0` (or `HONE_FAST=0`) keeps transformers' forward. Nothing here
imports Liger (hence Triton) unless the check said yes: on a CPU this module is inert.
"""

from __future__ import annotations

import torch

from honellm.core import support

MARK = "_hone_liger"  # set on the causal LM Liger was applied to: token_logprobs then takes the fused loss


def apply(model, device) -> str | None:
    """Apply Liger's RMSNorm, SwiGLU and rotary kernels to `model` (PEFT-wrapped or not) in place and mark it for
    the fused linear cross-entropy; return None, or the reason it was not applied (for the run log)."""
    problem = support.liger_problem(model, device)
    if problem is not None:
        return problem
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = support._unwrap(model)
    # The CausalLM forward keeps transformers' (Hone passes no labels and takes the loss itself, below).
    _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    # The fused loss applies the head alone: not where the model transforms the head's output (soft-capping,
    # scaled logits), whose log-probs keep the logits path.
    setattr(base, MARK, plain_head(base))
    return None


# Config fields of models whose forward transforms the LM head's output (the value that is harmless).
HEAD_TRANSFORMS = {"final_logit_softcapping": None, "logits_scaling": 1.0, "logit_scale": None,
                   "output_multiplier": None}


def plain_head(model) -> bool:
    """True when the model's logits are its output embedding's output as is (nothing applied after the head)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    return config is not None and all(getattr(config, name, harmless) in (harmless, None, 1, 1.0)
                                      for name, harmless in HEAD_TRANSFORMS.items())


def active(model) -> bool:
    """Whether `apply` applied Liger to `model` (under DDP/FSDP and PEFT wrappers)."""
    return bool(getattr(support._unwrap(model), MARK, False))


def token_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) for the hidden states [n, hidden] under the LM head, through Liger's fused linear
    cross-entropy (no [n, vocab] logits are kept), fp32 [n]."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    weight = head.weight
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")(
        weight, hidden.to(weight.dtype), targets, getattr(head, "bias", None))
    return -loss.float()
