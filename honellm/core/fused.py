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
casting the model; `HONE_FUSED_LORA=0` (or `HONE_FAST=0`) turns it off.

`install` also groups sibling LoRA layers that read the same input (q, k and v; gate and up, by their names in
LLaMA-family decoders): their frozen weights become views of one buffer (no copy; the replaced storage goes back
to the system), and the direct training forward (`honellm.core.fastpath`) runs each group as one
`LoraGroupFunction`: one base product, one adapter product and one in-place addition for the group, forward and
backward. A group steps aside, and its layers run one by one, wherever one of them would not take the fused path
or its weight is no longer a view of the buffer (the model was moved or cast since).
"""

from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F
from torch import nn

from honellm.core import support


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


class LoraGroupFunction(torch.autograd.Function):
    """Sibling LoRA layers that read the same input (a decoder layer's q, k and v projections; gate and up) as one:

        y = x @ W.T (+ b);   y += (x @ A.T) @ D.T        W = [W_1; W_2; ...] (one buffer), A = [A_1; A_2; ...],
                                                          D = blockdiag(scaling_i * B_i)

    the members' outputs side by side ([..., sum of their widths]; `group_forward` splits them). Three (or two) base
    products, adapter products and in-place additions become one each, in the forward and in the backward
    (`g_x = g @ W + (g @ D) @ A` in two calls): a third of the
    matrix-product calls of a LoRA step, and wider products that run closer to the machine's peak. `W` must be the
    buffer the members' frozen weights are views of (`install` arranges it), so no weight is copied."""

    @staticmethod
    def forward(ctx, x, weight, bias, splits: tuple[int, ...], scalings: tuple[float, ...], *adapters):
        n = len(splits)
        lora_as, lora_bs = adapters[:n], adapters[n:]
        dtype = x.dtype
        flat = x.reshape(-1, x.shape[-1])
        a = torch.cat([t.to(dtype) for t in lora_as])
        d = torch.block_diag(*[(t * s).to(dtype) for t, s in zip(lora_bs, scalings, strict=True)])
        h = flat @ a.t()
        y = F.linear(flat, weight, bias)
        y.addmm_(h, d.t())
        ctx.save_for_backward(flat, h, weight, a, d)
        ctx.splits, ctx.scalings, ctx.shape = splits, scalings, x.shape
        ctx.ranks = tuple(t.shape[0] for t in lora_as)
        ctx.adapter_dtypes = tuple(t.dtype for t in adapters)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, h, weight, a, d = ctx.saved_tensors
        n = len(ctx.splits)
        g = grad.reshape(-1, grad.shape[-1]).to(flat.dtype)
        g_h = g @ d  # [tokens, sum of ranks], the scalings included
        g_x = (g @ weight).addmm_(g_h, a).view(ctx.shape) if ctx.needs_input_grad[0] else None
        g_as = [t.to(dtype) for t, dtype in zip(torch.mm(g_h.t(), flat).split(ctx.ranks), ctx.adapter_dtypes[:n], strict=True)]
        g_b = torch.mm(g.t(), h)  # its diagonal blocks are the members' gradients
        g_bs, rows, cols = [], 0, 0
        for out, rank, scaling, dtype in zip(ctx.splits, ctx.ranks, ctx.scalings, ctx.adapter_dtypes[n:], strict=True):
            g_bs.append(g_b[rows:rows + out, cols:cols + rank].to(dtype).mul_(scaling))
            rows, cols = rows + out, cols + rank
        return (g_x, None, None, None, None, *g_as, *g_bs)


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
    The generation engine merges such layers into its derived weights (honellm/core/runners.py)."""
    parts = _one_adapter(layer)
    if parts is None:
        return None
    adapter = parts[0]
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
        return None
    return parts


def dora_parts(layer: nn.Module) -> tuple[str, nn.Linear, nn.Linear, nn.Linear, float, torch.Tensor] | None:
    """`(adapter, base, lora_A, lora_B, scaling, magnitude)` when `layer` is a PEFT DoRA `Linear`
    (https://arxiv.org/abs/2402.09353) computing exactly `m / ||W + s B A|| * (W + s B A) x + b` (the norm taken
    over each output row, `m` the [out_features] magnitude vector) with one active adapter: the same conditions as
    `lora_parts` except that DoRA, and no other variant, is the one active adapter's variant, and dropout has no
    effect now (eval mode, where PEFT's DoRA forward skips it, or no dropout at all). None for anything else.

    Only the generation engine uses it: it folds such layers into its derived weights with PEFT's merge arithmetic
    (honellm/core/runners.py). The training paths here leave DoRA to PEFT's own forward."""
    try:
        from peft.tuners.lora.dora import DoraLinearLayer
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:  # a PEFT without LoRA variants: its DoRA layers keep their own forward
        return None
    parts = _one_adapter(layer)
    if parts is None:
        return None
    adapter = parts[0]
    if (type(getattr(layer, "lora_variant", {}).get(adapter)) is not DoraLinearVariant
            or not getattr(layer, "use_dora", {}).get(adapter, False)):
        return None
    magnitudes = getattr(layer, "lora_magnitude_vector", None)  # an nn.ModuleDict, which has no .get
    if magnitudes is None or adapter not in magnitudes:
        return None
    magnitude = magnitudes[adapter]
    if (type(magnitude) is not DoraLinearLayer or magnitude.fan_in_fan_out
            or magnitude.weight.shape != (parts[1].weight.shape[0],)):
        return None
    dropout = layer.lora_dropout[adapter]
    if layer.training and not isinstance(dropout, nn.Identity) and getattr(dropout, "p", 1.0) > 0:
        return None
    return (*parts, magnitude.weight)


def _one_adapter(layer: nn.Module) -> tuple[str, nn.Linear, nn.Linear, nn.Linear, float] | None:
    """`(adapter, base, lora_A, lora_B, scaling)` of a PEFT LoRA `Linear` with one active adapter, not disabled
    or merged, over an `nn.Linear` (not transposed), whose A and B are bias-free `nn.Linear`s and whose scaling is a
    number; None otherwise. Whether a variant (DoRA ...) is on is for the callers to check."""
    if not hasattr(layer, "lora_A") or type(getattr(layer, "base_layer", None)) is not nn.Linear:
        return None
    if layer.disable_adapters or layer.merged or getattr(layer, "fan_in_fan_out", False):
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    adapter = active[0]
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


# Sibling projections that read the same input, by the names LLaMA-family decoders give them.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def group_forward(parent: nn.Module, names: tuple[str, ...], x: torch.Tensor,
                  whole: bool = False) -> tuple[torch.Tensor, ...] | torch.Tensor | None:
    """The outputs of `parent`'s sibling LoRA layers `names` on `x` through `LoraGroupFunction` (with `whole`, side by
    side in one tensor, as the product made them; else split, one per layer; with every adapter disabled, as for a
    reference model under PEFT's `disable_adapter()`, the base products as one), or None where the
    group does not apply now (no group was formed, a member is not on the fused path for this call, or a member's
    weight is no longer a view of the group's buffer: the model was moved or cast since); the caller then calls the
    layers one by one."""
    group = parent.__dict__.get("_hone_groups", {}).get(names)
    if group is None:
        return None
    weight, bias = group
    dtype = _compute_dtype(x, weight)
    if dtype is None or weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
        return None
    layers = [getattr(parent, name) for name in names]
    if all(_disabled(layer) for layer in layers):  # under PEFT's disable_adapter(): the base products, as one
        bases = [layer.base_layer for layer in layers]
        if not x.is_floating_point() or not _still_grouped(parent, names, bases):
            return None
        splits = [base.weight.shape[0] for base in bases]
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x.to(dtype), weight, bias)
        return y if whole else y.split(splits, dim=-1)
    adapters, splits, scalings, offset = [], [], [], 0
    for layer in layers:
        if not _installed(layer):
            return None
        adapter = _fusable_adapter(layer, x, (), {})
        if adapter is None or not _is_view_of(layer.base_layer, weight, bias, offset):
            return None
        out = layer.base_layer.weight.shape[0]
        adapters.append(adapter)
        splits.append(out)
        scalings.append(float(layer.scaling[adapter]))
        offset += out
    lora_as = [layer.lora_A[a].weight for layer, a in zip(layers, adapters, strict=True)]
    lora_bs = [layer.lora_B[a].weight for layer, a in zip(layers, adapters, strict=True)]
    with torch.autocast(x.device.type, enabled=False):
        y = LoraGroupFunction.apply(x.to(dtype), weight, bias, tuple(splits), tuple(scalings), *lora_as, *lora_bs)
    return y if whole else y.split(splits, dim=-1)


def _installed(module: nn.Module) -> bool:
    """Whether `install` gave `module` the fused forward (and `uninstall` has not taken it back)."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _fused_forward


def _disabled(layer: nn.Module) -> bool:
    """Whether `layer` is an installed LoRA layer whose adapters are disabled (not merged): it computes its base
    layer's product alone, so the group's buffer can compute it."""
    return (_installed(layer) and type(getattr(layer, "base_layer", None)) is nn.Linear and bool(layer.disable_adapters)
            and not layer.merged and not layer.base_layer.weight.requires_grad)


def _is_view_of(base: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, offset: int) -> bool:
    """Whether `base`'s weight (and bias) are still rows `offset:` of the group's buffers."""
    w = base.weight
    if w.dtype != weight.dtype or w.device != weight.device or w.shape[1] != weight.shape[1] or not w.is_contiguous():
        return False
    if w.data_ptr() != weight.data_ptr() + offset * weight.shape[1] * weight.element_size():
        return False
    if (base.bias is None) != (bias is None):
        return False
    return bias is None or base.bias.data_ptr() == bias.data_ptr() + offset * bias.element_size()


def _still_grouped(parent: nn.Module, names: tuple[str, ...], bases: list[nn.Linear]) -> bool:
    group = parent.__dict__.get("_hone_groups", {}).get(names)
    if group is None:
        return False
    offsets = [0]
    for base in bases[:-1]:
        offsets.append(offsets[-1] + base.weight.shape[0])
    return all(_is_view_of(base, *group, offset) for base, offset in zip(bases, offsets, strict=True))


def _form_groups(model: nn.Module, layer_type: type) -> int:
    """Make the frozen weights (and biases) of each set of `SIBLINGS` LoRA layers views of one buffer, so that
    `LoraGroupFunction` can multiply by all of them at once without a copy; return how many groups were formed."""
    count = 0
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, name, None) for name in names]
            if any(type(m) is not layer_type or lora_parts(m) is None for m in members):
                continue
            bases = [m.base_layer for m in members]
            if _still_grouped(parent, names, bases):
                continue
            weights = [b.weight for b in bases]
            biases = [b.bias for b in bases]
            first = weights[0]
            if any(w.requires_grad or type(w) is not nn.Parameter or w.dtype != first.dtype or w.device != first.device
                   or w.shape[1] != first.shape[1] for w in weights):
                continue
            if any((b is None) != (biases[0] is None) or (b is not None and (b.requires_grad or b.dtype != first.dtype))
                   for b in biases):
                continue
            weight = torch.cat([w.data for w in weights])
            bias = None if biases[0] is None else torch.cat([b.data for b in biases])
            offset = 0
            for base in bases:
                out = base.weight.shape[0]
                base.weight.data = weight[offset:offset + out]
                if bias is not None:
                    base.bias.data = bias[offset:offset + out]
                offset += out
            parent.__dict__.setdefault("_hone_groups", {})[names] = (weight, bias)
            count += 1
    return count


def install(model: nn.Module) -> int:
    """Give every PEFT LoRA `Linear` of `model` the fused forward (see the module docstring); return how many.

    The layers stay PEFT's (same class, parameters and state dict): only their instance `forward` changes, and
    `uninstall` restores it. `HONE_FUSED_LORA=0` in the environment turns it off (to compare, or to rule it out), and
    so does `HONE_FAST=0` (every fast path off, see `honellm.core.support`)."""
    if os.environ.get("HONE_FUSED_LORA", "1") == "0" or not support.enabled():
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
    if _form_groups(model, LoraLinear):
        from honellm.hardware import release_freed_memory

        release_freed_memory()  # the weights the groups replaced
    return count


def uninstall(model: nn.Module) -> None:
    """Restore PEFT's own forward on every layer `install` changed."""
    for module in model.modules():
        if _installed(module):
            del module.forward
