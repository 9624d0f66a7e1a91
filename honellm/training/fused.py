"""Fused training paths for PEFT's LoRA layers: the same function, fewer passes over the activations.

PEFT computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: for each adapted linear layer of
a small model that is, besides the base product, a full-width multiplication by `scaling`, a full-width addition,
and in the backward pass their mirror images, each one more pass over a [tokens x out_features] activation. On a
135M model at a few hundred tokens per micro-batch, those passes (and the autograd nodes behind them) cost about
as much as the base layer's own matrix products.

`LoraLinearFunction` computes the same value with two matrix products that accumulate into one output:

    y = x @ W.T (+ b);   y += scaling * (x @ A.T) @ B.T          (one in-place addmm, no extra pass)

and its backward computes the three gradients it needs (x, A, B; the frozen W gets none) with the same trick:

    g_h = g @ B                       [tokens x r]
    g_x = g @ W;  g_x += scaling * g_h @ A
    g_A = scaling * g_h.T @ x;   g_B = scaling * g.T @ h

It runs in the compute dtype (autocast's, bf16 on an AMX CPU), like PEFT under autocast, and returns fp32
gradients for the fp32 adapter weights. `install(model)` switches it on for every LoRA layer where it is exact:
plain LoRA (rsLoRA scaling and PiSSA/OLoRA initialisations included) on an `nn.Linear` with a frozen weight, one
active adapter, no dropout while training, no DoRA or other variant, no LoRA bias, not merged, no DTensor
(FSDP) parameters. Each such layer checks those conditions on every call and falls back to PEFT's own forward
when one fails (adapters disabled or merged later, for instance), so nothing about saving, merging or loading
changes: the layer is still PEFT's. The training recipes (SFT, preference, reward model, RL) install it after
casting the model; `HONE_FUSED_LORA=0` turns it off.
"""

from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F
from torch import nn


class LoraLinearFunction(torch.autograd.Function):
    """`F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_a), lora_b)`, fused (see the module
    docstring). `weight` and `bias` are frozen; `lora_a` [r, in] and `lora_b` [out, r] may be fp32: they are used in
    `x`'s dtype and their gradients come back in their own."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        dtype = x.dtype
        flat = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        h = flat @ a.t()
        y = F.linear(flat, weight, bias)
        y.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(flat, h, weight, a, b)
        ctx.scaling = scaling
        ctx.shape = x.shape
        ctx.adapter_dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, h, weight, a, b = ctx.saved_tensors
        scaling = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1]).to(flat.dtype)
        g_h = g @ b  # [tokens, r]
        g_x = g_a = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = (g @ weight).addmm_(g_h, a, alpha=scaling).view(ctx.shape)
        if ctx.needs_input_grad[3]:
            g_a = torch.mm(g_h.t(), flat).to(ctx.adapter_dtypes[0]).mul_(scaling)
        if ctx.needs_input_grad[4]:
            g_b = torch.mm(g.t(), h).to(ctx.adapter_dtypes[1]).mul_(scaling)
        return g_x, None, None, g_a, g_b, None


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype the layer computes in (autocast's when it is on), or None when it is not one we fuse."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype if x.dtype == weight.dtype else None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT `lora.Linear.forward` that takes the fused path when it is exact, else PEFT's own."""
    adapter = _fusable_adapter(self, x, args, kwargs)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    dtype = _compute_dtype(x, base.weight)
    if dtype is None or base.weight.dtype != dtype or (base.bias is not None and base.bias.dtype != dtype):
        return type(self).forward(self, x, *args, **kwargs)
    with torch.autocast(x.device.type, enabled=False):
        return LoraLinearFunction.apply(x.to(dtype), base.weight, base.bias, self.lora_A[adapter].weight,
                                        self.lora_B[adapter].weight, float(self.scaling[adapter]))


def lora_parts(layer: nn.Module) -> tuple[str, nn.Linear, nn.Linear, nn.Linear, float] | None:
    """`(adapter, base, lora_A, lora_B, scaling)` when `layer` is a PEFT LoRA `Linear` computing exactly
    `base(x) + scaling * lora_B(lora_A(dropout(x)))` with one active adapter: plain LoRA (rsLoRA scaling and any
    initialisation included) over an `nn.Linear`, no DoRA or other variant, no bias on the adapter. None for
    anything else, and for a layer whose adapters are disabled or merged (its caller decides what those mean).
    The generation engine merges such layers into its derived weights (honellm/generation/runners.py)."""
    if not hasattr(layer, "lora_A") or type(getattr(layer, "base_layer", None)) is not nn.Linear:
        return None
    if layer.disable_adapters or layer.merged or getattr(layer, "fan_in_fan_out", False):
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    adapter = active[0]
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
        return None
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None or lora_b.bias is not None:
        return None
    scaling = layer.scaling.get(adapter)
    if not isinstance(scaling, (int, float)):
        return None
    return adapter, layer.base_layer, lora_a, lora_b, float(scaling)


def _fusable_adapter(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active adapter of `layer` when the fused path computes exactly what PEFT would, else None."""
    if args or kwargs or not x.is_floating_point():
        return None
    parts = lora_parts(layer)
    if parts is None:
        return None
    adapter, base, lora_a, lora_b, _ = parts
    dropout = layer.lora_dropout[adapter]
    if layer.training and not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 1.0) > 0:
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if any(type(p) is not nn.Parameter and type(p) is not torch.Tensor
           for p in (base.weight, lora_a.weight, lora_b.weight)):
        return None  # DTensor (FSDP) or another tensor subclass: leave it to PEFT
    return adapter


def install(model: nn.Module) -> int:
    """Give every PEFT LoRA `Linear` of `model` the fused forward (see the module docstring); return how many.

    The layers stay PEFT's (same class, parameters and state dict): only their instance `forward` changes, and
    `uninstall` restores it. `HONE_FUSED_LORA=0` in the environment turns it off (to compare, or to rule it out)."""
    if os.environ.get("HONE_FUSED_LORA", "1") == "0":
        return 0
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return 0
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def uninstall(model: nn.Module) -> None:
    """Restore PEFT's own forward on every layer `install` changed."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__func__ is _fused_forward:
            del module.forward
