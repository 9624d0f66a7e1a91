"""A direct training forward for LLaMA-family decoders: the same arithmetic as transformers' modules, without
their per-call machinery.

On a 135M model at a few hundred tokens per micro-batch, a LoRA training step spends about a quarter of its
time in Python: transformers' decorators, output capturing and keyword handling around every layer, PEFT's
dispatch around every adapted projection, nn.Module.__call__ around every norm and activation. `hidden_states`
computes the decoder's final hidden states with the modules' own parameters (and PEFT's own adapters) but calls
the arithmetic directly: RMSNorm in fp32 exactly as `LlamaRMSNorm`, rotary embeddings from the model's own
`rotary_emb` (so every rope scaling type is honoured), attention as transformers' eager attention computes it
(the kernel Hone's SFT picks on CPU for sequences up to 256 tokens), and each projection through its own forward
without nn.Module's call machinery (PEFT's layers, with the fused LoRA path where `honellm.core.fused` installed it: DoRA, IA3, LoHa, LoKr and full fine-tuning work
unchanged).

Measured on SmolLM2-135M, LoRA r=8 on all projections, 8 SST-2 examples per micro-batch, bf16 autocast: step
time 0.89-0.97 of the transformers path (medians of 24-32 interleaved step pairs in one process, four
measurements), 1.07x tokens/s over four alternated `bench/bench_sft.py` runs; gradients as accurate against fp32
as transformers' (3.10% vs 3.08% relative error).

Three more savings, each the same function of the same weights:
- a prefix every sequence of the batch starts with (a task's system prompt and template, a GRPO group's prompt)
  is computed once and attended to by every sequence (`shared_prefix`): on the SFT benchmark's SST-2 batches 28
  of 59 tokens per sequence (1.19-1.25x tokens/s, step pairs interleaved in one process, three runs);
- with `index` (the positions a loss reads), the last layer runs its output projection and MLP on those rows
  only, and the caller (`honellm.training.logprobs`) drops the columns after the last of them;
- q/k/v and gate/up LoRA projections run as one grouped product where `honellm.core.fused` grouped them.
Together 1.29x and 1.70x tokens/s in two `bench/bench_sft.py` runs alternated with the code before them
(bench/README.md).

And fewer passes over the activations: attention folds the query heads of a key/value head into the query length
(`_attention`: no `repeat_kv` copies), and in bf16 where `honellm.core.native`'s kernels run, RMSNorm (frozen weight),
SwiGLU and the q|k|v split with its rotary embedding and shared-prefix layout take one pass forward and one backward
each, with torch's rounding: 1.43x and 1.48x tokens/s in two `bench_sft.py` runs alternated with the code before.

It applies where it is exact: in fp32 the loss and gradients equal transformers' path's up to summation order
(1e-6 relative, tested for LoRA, DoRA, IA3 and full fine-tuning; before the three savings above, bit for bit).
Conditions: the architecture is one `honellm.core.support` says the training forward computes exactly (model
types `llama`, `mistral` and `qwen2` without a sliding window shorter than the context, soft-capping, scaled
embeddings or a rope type it does not implement), eager attention (sdpa configurations keep transformers' path,
which chooses among kernels and mask layouts by version and device), one process or DDP (run inside DDP's own
forward; FSDP wrappers and any module hook keep transformers' path), no prompt-learning adapter (virtual tokens change
the input), no attention dropout while training, decoder layers not compiled (`compile=true` keeps transformers'
path, which is the one it compiles). Gradient checkpointing is honoured per layer. Anything else takes the
transformers path; `HONE_FAST=0` (every fast path) or `HONE_FAST_FORWARD=0` (this one) forces it, `HONE_SHARED_PREFIX=0` computes every sequence in full.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from honellm.core import fused, native, support


@functools.cache
def _transformers_parts():
    """(SiLUActivation, rotate_half): transformers' own, imported at the first forward, not with this module. This
    module is the only one of the package that imported transformers at load time, so every `hone` command paid
    transformers' import (about 2 s on 2 cores) before it could look a method up or report a user error."""
    # start-up time: transformers loads with the first model, not with the method table
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import rotate_half

    return SiLUActivation, rotate_half


# A common prefix shorter than this is computed per sequence (two attention calls per layer cost more than it saves).
MIN_SHARED_PREFIX = 16
QKV, GATE_UP = fused.SIBLINGS


def decoder_of(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """`(causal_lm, decoder)` under a PEFT wrapper, when `model` is one this forward computes exactly; else None.

    What holds for the architecture is `support.training_config_problem`'s answer (the one check every caller
    asks); what may change from call to call (a wrapper, a hook, dropout in training mode, the attention kernel a
    run picked, a compiled layer) is checked here."""
    if getattr(model, "module", None) is not None and isinstance(model.module, nn.Module):
        return None  # DDP / FSDP wrapper: its hooks run in its own forward
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return None
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    decoder = getattr(lm, "model", None)
    if config is None or decoder is None or not support.enabled() or support.training_config_problem(config):
        return None
    if getattr(config, "_attn_implementation", None) != "eager":
        return None  # sdpa's kernels and transformers' choice among them (mask or not, GQA or repeated heads) vary
    layers = getattr(decoder, "layers", None)
    if not layers or not hasattr(decoder, "rotary_emb") or not hasattr(decoder, "embed_tokens"):
        return None
    if _hooked(model) or _hooked(lm) or _hooked(decoder) or _global_hooks():
        return None  # a hook on a module this forward does not call would silently not run
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or hasattr(attn, "q_norm") or getattr(layer, "_compiled_call_impl", None) is not None:
            return None
        if _hooked(layer) or _hooked(attn) or _hooked(layer.mlp):
            return None
        if lm.training and getattr(attn, "attention_dropout", 0.0):
            return None
    return lm, decoder


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  index: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None
                  ) -> torch.Tensor | None:
    """The decoder's final (normed) hidden states for a right-padded batch, or None when this forward does not apply
    to `model` (the caller then runs the model itself): [B, T, hidden], or with `index` (flat row-major positions
    into [B, T]) the [n, hidden] states of those positions only. With `index`, the last layer runs its output
    projection, MLP and the final norm on those rows only (no other row is read after its attention; for an SFT
    answer of two tokens that is most of the last layer's work).

    Under DDP the direct forward runs inside the wrapper's own forward (DDP prepares its gradient reducer there, and
    a forward that bypassed it would leave the gradients unsynchronised): the wrapped module's `forward` is this
    function for the duration of the call.

    `position_ids` ([B, T], restarting at 0 where a sequence starts) marks a packed batch
    (`honellm.training.batching.pack`): rotary embeddings at those positions and a block-diagonal causal mask, so
    each sequence attends to itself only; exactly what transformers computes for the same packed input (tested)."""
    if isinstance(model, DistributedDataParallel):
        inner = model.module
        found = decoder_of(inner)
        if found is None:
            return None
        inner.forward = functools.partial(_direct, *found)  # an instance attribute: nn.Module.__call__ finds it first
        try:
            return model(input_ids, attention_mask, index, position_ids)
        finally:
            del inner.forward
    found = decoder_of(model)
    return None if found is None else _direct(*found, input_ids, attention_mask, index, position_ids)


def _direct(lm: nn.Module, decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            index: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    if position_ids is not None:
        x = decoder.embed_tokens(input_ids)
        cos, sin = decoder.rotary_emb(x, position_ids)
        return _run_layers(lm, decoder, x, (cos.unsqueeze(1), sin.unsqueeze(1)), packed_mask(position_ids), None,
                           index)
    prefix = shared_prefix(input_ids, attention_mask)
    if prefix:
        return _direct_shared(lm, decoder, input_ids, attention_mask, prefix, index)
    batch, width = input_ids.shape
    x = decoder.embed_tokens(input_ids)
    positions = torch.arange(width, device=input_ids.device).unsqueeze(0).expand(batch, width)
    cos, sin = decoder.rotary_emb(x, positions)
    rotary = (cos.unsqueeze(1), sin.unsqueeze(1))
    return _run_layers(lm, decoder, x, rotary, _attention_mask(attention_mask, width), None, index)


def _direct_shared(lm: nn.Module, decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   prefix: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """The same hidden states with the batch's common prefix computed once (see `shared_prefix`).

    The layers run over one flat row of `prefix + batch x rest` tokens: the prefix once, then each sequence's
    remainder. Every row-wise operation (norms, projections, MLP) is the same per token; attention runs twice, the
    prefix's queries over the prefix (causal), each remainder's queries over the prefix's keys and values (expanded
    to the batch, so their gradients sum over it) followed by its own. The result is expanded back to [B, T, H]
    (or `index` mapped into the flat row)."""
    batch, width = input_ids.shape
    rest = width - prefix
    device = input_ids.device
    flat_ids = torch.cat([input_ids[0, :prefix], input_ids[:, prefix:].reshape(-1)]).unsqueeze(0)
    x = decoder.embed_tokens(flat_ids)
    positions = torch.cat([torch.arange(prefix, device=device),
                           torch.arange(prefix, width, device=device).repeat(batch)]).unsqueeze(0)
    cos, sin = decoder.rotary_emb(x, positions)
    rotary = (cos.unsqueeze(1), sin.unsqueeze(1))
    prefix_mask = _attention_mask(attention_mask[:1, :prefix], prefix)
    rest_mask = _attention_mask(attention_mask[:, prefix:], rest)
    rest_mask = torch.cat([rest_mask.new_zeros(batch, 1, rest, prefix), rest_mask], dim=-1)  # the prefix is all real
    if index is not None:
        rows, cols = index // width, index % width
        flat_index = torch.where(cols < prefix, cols, prefix + rows * rest + (cols - prefix))
        return _run_layers(lm, decoder, x, rotary, (prefix_mask, rest_mask), (prefix, batch), flat_index)
    h = _run_layers(lm, decoder, x, rotary, (prefix_mask, rest_mask), (prefix, batch))[0]
    return torch.cat([h[:prefix].expand(batch, prefix, h.shape[-1]), h[prefix:].view(batch, rest, h.shape[-1])], dim=1)


def _run_layers(lm: nn.Module, decoder: nn.Module, x: torch.Tensor, rotary: tuple, mask, shared,
                keep: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder layers and the final norm; with `keep` (flat indices into x's rows), the last layer's output rows
    `keep` only, [n, hidden]."""
    checkpointing = lm.training and getattr(decoder, "gradient_checkpointing", False)
    last = len(decoder.layers) - 1
    for i, layer in enumerate(decoder.layers):
        args = (layer, x, rotary, mask, shared) + ((keep,) if i == last and keep is not None else ())
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(_layer, *args, use_reentrant=False)
        else:
            x = _layer(*args)
    return _rms_norm(decoder.norm, x)


def shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many leading tokens every sequence of a right-padded batch has in common, where computing them once
    pays (0 otherwise): a task's system prompt and template (28 of SST-2's 59 tokens on average in the SFT
    benchmark), the prompt shared by a GRPO group's completions, the prompt of a preference pair.

    The result is the same function of the same weights: the same loss, and the same gradients up to the order in
    which the prefix's are summed (exact in real arithmetic; in floating point as close as any change of summation
    order). At least `MIN_SHARED_PREFIX` tokens and two sequences; at most the shortest sequence's length less one
    (each keeps a token of its own). `HONE_SHARED_PREFIX=0` turns it off."""
    batch, width = input_ids.shape
    if batch < 2 or width <= MIN_SHARED_PREFIX or os.environ.get("HONE_SHARED_PREFIX", "1") == "0":
        return 0
    same = ((input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)).int()
    shortest = int(attention_mask.sum(1).min())
    prefix = min(int(same.cumprod(0).sum()), shortest - 1)
    return prefix if prefix >= MIN_SHARED_PREFIX else 0


def _attention_mask(attention_mask: torch.Tensor, width: int) -> torch.Tensor:
    """Additive causal and padding mask [B, 1, T, T] in fp32, as transformers builds it for eager attention.

    A padding query (right padding) still sees the real keys before it, so its row stays finite; no real query
    sees a padding key."""
    device = attention_mask.device
    allowed = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = allowed[None, None] & attention_mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill_(
        ~allowed, torch.finfo(torch.float32).min)


def packed_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Additive block-diagonal causal mask [B, 1, T, T] in fp32 for packed rows: a new sequence starts wherever
    the position does not follow the previous one (transformers' `find_packed_sequence_indices` rule), and a
    query sees the keys of its own sequence up to itself."""
    device, width = position_ids.device, position_ids.shape[1]
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    segment = starts.long().cumsum(1)
    allowed = torch.ones(width, width, dtype=torch.bool, device=device).tril()[None]
    allowed = (allowed & (segment[:, :, None] == segment[:, None, :]))[:, None]
    return torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill_(
        ~allowed, torch.finfo(torch.float32).min)


def _layer(layer: nn.Module, x: torch.Tensor, rotary: tuple, mask, shared: tuple[int, int] | None,
           keep: torch.Tensor | None = None) -> torch.Tensor:
    """One decoder layer over x [B, T, hidden] (or the shared layout's [1, rows, hidden]); with `keep`, the rows
    `keep` of its output only, [n, hidden] (every row still serves as a key and value)."""
    attn, mlp = layer.self_attn, layer.mlp
    batch, width, _ = x.shape
    h = _rms_norm(layer.input_layernorm, x)
    if shared is None:
        layout = (0, batch, width)
    else:
        prefix, rows = shared
        layout = (prefix, rows, (width - prefix) // rows)
    q_prefix, q_rest, keys, values = _queries_keys_values(attn, h, rotary, *layout)
    if shared is None:
        out = _attention(attn, q_rest, keys, values, mask).transpose(1, 2).reshape(batch, width, -1)
    else:
        prefix_mask, rest_mask = mask
        out_prefix = _attention(attn, q_prefix, keys[:1, :, :prefix], values[:1, :, :prefix], prefix_mask)
        out_rest = _attention(attn, q_rest, keys, values, rest_mask)
        out = torch.cat([out_prefix.transpose(1, 2).flatten(0, 1), out_rest.transpose(1, 2).flatten(0, 1)])
        out = out.reshape(1, width, -1)
    if keep is not None:
        x, out = x.flatten(0, 1).index_select(0, keep), out.flatten(0, 1).index_select(0, keep)
    x = x + _linear(attn.o_proj, out)
    h = _rms_norm(layer.post_attention_layernorm, x)
    gate_up = fused.group_forward(mlp, GATE_UP, h, whole=True) if not _hooked_any(mlp, GATE_UP) else None
    if gate_up is not None:
        act = _swiglu(mlp, gate_up)
    else:
        act = mlp.act_fn(_linear(mlp.gate_proj, h)) * _linear(mlp.up_proj, h)
    return x + _linear(mlp.down_proj, act)


def _queries_keys_values(attn: nn.Module, h: torch.Tensor, rotary: tuple, prefix: int, batch: int, rest: int):
    """A layer's queries, keys and values, rotated and laid out for attention: `(q_prefix [1, heads, prefix, d]
    (empty or None without a prefix), q_rest [batch, heads, rest, d], keys, values [batch, kv_heads, prefix + rest, d])`, the shared prefix's
    keys and values in front of every sequence's own (h holds `prefix + batch x rest` rows). In bf16 where the
    native kernels run, one pass forward and one backward over the grouped q|k|v product (`QKVRotaryFunction`);
    else torch's operations: views, `q * cos + rotate_half(q) * sin`, a concatenation."""
    d = attn.head_dim
    heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
    cos, sin = rotary
    grouped = fused.group_forward(attn, QKV, h, whole=True) if not _hooked_any(attn, QKV) else None
    if grouped is not None and grouped.dtype == torch.bfloat16:
        layout = native.Layout(prefix, batch, rest, heads, kv_heads, d)
        flat, flat_cos, flat_sin = grouped.reshape(-1, grouped.shape[-1]), cos.reshape(-1, d), sin.reshape(-1, d)
        if native.qkv_rotary_applies(flat, flat_cos, flat_sin, layout):
            return QKVRotaryFunction.apply(flat, flat_cos, flat_sin, layout)
    if grouped is not None:
        qkv = grouped.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    else:
        qkv = _linear(attn.q_proj, h), _linear(attn.k_proj, h), _linear(attn.v_proj, h)
    q, k, v = (t.view(*h.shape[:2], -1, d).transpose(1, 2) for t in qkv)
    rotate_half = _transformers_parts()[1]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    if not prefix:
        return None, q, k, v

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [1, heads, prefix + batch x rest, d]
        return t[:, :, :prefix], t[0, :, prefix:].unflatten(1, (batch, rest)).transpose(0, 1)

    (q_prefix, q_rest), (k_prefix, k_rest), (v_prefix, v_rest) = split(q), split(k), split(v)
    keys = torch.cat([k_prefix.expand(batch, -1, -1, -1), k_rest], dim=2)
    values = torch.cat([v_prefix.expand(batch, -1, -1, -1), v_rest], dim=2)
    return q_prefix, q_rest, keys, values


class QKVRotaryFunction(torch.autograd.Function):
    """`native.qkv_rotary` with its gradient: the rotary embedding, the split into heads, the shared prefix's
    keys and values placed before every sequence's, in one pass each way over the layer's q|k|v product (torch
    would run the split, two rotations of five operations each, copies for the layout and a concatenation, and
    their mirror images; the same bits)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, layout):
        ctx.save_for_backward(cos, sin)
        ctx.layout, ctx.shape = layout, qkv.shape
        return native.qkv_rotary(qkv, cos, sin, layout)

    @staticmethod
    def backward(ctx, *grads):
        cos, sin = ctx.saved_tensors
        return native.qkv_rotary_backward(grads, cos, sin, ctx.layout).view(ctx.shape), None, None, None


def _hooked_any(parent: nn.Module, names: tuple[str, ...]) -> bool:
    return any(_hooked(getattr(parent, name)) for name in names)


def _attention(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' eager attention: [B, heads, T, d] queries against [B, kv_heads, S, d] keys and values.

    The query heads that share a key/value head are folded into the query length ([B, kv_heads, groups x T, d]:
    a free view, heads being ordered by their key/value head), so each product reads the keys and values once
    and their gradients come out summed over the group; transformers' `repeat_kv` copies them `groups` times
    and its backward reduces over a middle dimension (a step 0.92x the time on SmolLM2's 3 x 3 heads, measured
    in interleaved pairs)."""
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    folded = q.reshape(batch, kv_heads, heads // kv_heads * length, dim)
    scores = torch.matmul(folded, k.transpose(2, 3)).view(batch, heads, length, -1) * attn.scaling + mask
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs.view(batch, kv_heads, -1, probs.shape[-1]), v).view(batch, heads, length, dim)


def _swiglu(mlp: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """`act_fn(gate) * up` for the MLP's gate and up products side by side: one native pass each way
    (`SwiGLUFunction`) for SiLU in bf16 where the kernels run, else torch's operations on the two halves."""
    if (type(mlp.act_fn) in (_transformers_parts()[0], nn.SiLU) and gate_up.dtype == torch.bfloat16
            and gate_up.device.type == "cpu" and gate_up.stride(-1) == 1 and gate_up.shape[-1] % 2 == 0
            and native.training_kernels()):
        return SwiGLUFunction.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return mlp.act_fn(gate) * up


class SwiGLUFunction(torch.autograd.Function):
    """`silu(gate) * up` over z = [gate | up] with `honellm.core.native`'s kernels: one pass forward, one backward that
    writes both halves of z's gradient into one tensor (autograd would run silu, a product, their two backward
    nodes and a concatenation: 0.51x the time at [284, 2 x 1536], the same bits)."""

    @staticmethod
    def forward(ctx, z):
        flat = z.reshape(-1, z.shape[-1])
        ctx.save_for_backward(flat)
        ctx.shape = z.shape
        return native.swiglu(flat).view(*z.shape[:-1], z.shape[-1] // 2)

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        return native.swiglu_backward(grad.reshape(-1, grad.shape[-1]), flat).view(ctx.shape)


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A projection without nn.Module.__call__ where no hook needs it (global hooks were ruled out by
    `decoder_of`): a plain nn.Linear directly, a PEFT layer through its own forward (the fused LoRA one where
    `honellm.core.fused.install` put it)."""
    if _hooked(module):
        return module(x)
    if type(module) is nn.Linear:
        return F.linear(x, module.weight, module.bias)
    return module.forward(x)


def _rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`LlamaRMSNorm` (and Mistral's, Qwen2's): normalise in fp32, round, then scale by the weight."""
    if x.dtype != torch.float32 and torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad):
        # In fp32 runs autograd's graph below is kept: it gives transformers' gradients bit for bit, so a run trains
        # to the same weights whichever path it takes (an sdpa, FSDP or hooked run takes transformers').
        return RMSNormFunction.apply(x, module.weight, module.variance_epsilon)
    if x.dtype == torch.bfloat16 and not module.weight.requires_grad:
        fast = native.rms_norm(x.reshape(-1, x.shape[-1]), module.weight, module.variance_epsilon)
        if fast is not None:
            return fast[0].view(x.shape)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return module.weight * h.to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """`weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)` with a hand-written backward:

        n = x * r (fp32),  g_n = g * weight,  g_x = r * (g_n - n * mean(g_n * n))

    Autograd would record seven nodes per norm and replay each; this saves `x` and `r` only and computes the
    input gradient in five passes (measured: forward plus backward at [8, 60, 576] bf16 in 0.52x the time, 61
    norms per step of SmolLM2). The weight gets its gradient when it trains (full fine-tuning)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        flat = x.reshape(-1, x.shape[-1])
        fast = None if ctx.needs_input_grad[1] else native.rms_norm(flat, weight, eps)
        ctx.native = fast is not None
        if fast is not None:  # one pass each way in honellm.core.native (bf16, frozen weight)
            y, r = fast
            ctx.save_for_backward(flat, r, weight)
            return y.view(x.shape)
        x32 = x.float()
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, r, weight)
        return weight * (x32 * r).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.native:
            flat, r, weight = ctx.saved_tensors
            return native.rms_norm_backward(grad.reshape(-1, grad.shape[-1]), flat, r, weight).view(grad.shape), None, None
        x, r, weight = ctx.saved_tensors
        n = x.float().mul_(r)
        g_x = g_w = None
        if ctx.needs_input_grad[1]:
            g_w = (grad * n.to(x.dtype)).reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g_n = (grad * weight).float()
            dot = (g_n * n).mean(-1, keepdim=True)
            g_x = g_n.sub_(n.mul_(dot)).mul_(r).to(x.dtype)
        return g_x, g_w, None
