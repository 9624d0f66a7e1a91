"""Packed batches on CUDA without the flash-attn package: PyTorch's own variable-length attention kernel.

A packed row (`honellm.training.batching.pack`: sequences end to end, boundaries in the position ids and the
cumulative lengths) needs an attention kernel that keeps each sequence to itself *and computes only inside it*.
flash-attn's varlen kernel does, but the package is a long source build against one torch, and most GPU users lack
it; sdpa keeps the sequences apart with a block-diagonal mask but still computes attention across the whole row
(a row of k sequences costs about k times their attention). PyTorch 2.10+ ships the same flash-attention kernels
as `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16): this module puts it behind transformers' attention
interface, under the name `hone_varlen`, so a packed SFT run on any CUDA PyTorch computes per-sequence attention.

Why our own attention function and not a transformers one: transformers (5.x) calls torch's varlen kernel nowhere;
its `flash_attention_2` needs the flash-attn package and its `flex_attention` compiles a block mask per batch shape.

How it runs:
- a packed forward (`packed_forward()` around the call, the cumulative lengths `cu_seq_lens_q` passed as
  transformers' flash kwargs by `training.logprobs.packed_inputs`): transformers builds no mask (this name's mask
  function returns none while `packed_forward` is active) and `attention` calls the varlen kernel with causal (or
  the layer's sliding-window) bounds, grouped-query heads as they are. Gradient checkpointing's recomputation
  passes the same lengths again.
- every other forward of the same model (padded validation batches, generation with a KV cache): transformers'
  own sdpa path, with the mask transformers' `sdpa_mask` builds: exactly what `attn_implementation="sdpa"` runs.

Exactness: the kernel is flash-attention's, not bit-for-bit sdpa's (both are exact attention; their bf16 roundings
differ, as transformers' `flash_attention_2` differs from its sdpa). `support.varlen_problem` steps aside where the
kernel would compute something else (soft-capping, attention sinks, attention dropout, non-causal attention, a
sliding window on a torch without window bounds, fp32 compute, no CUDA) and `self_check()` runs it once per process
and setting against per-sequence attention on the device (values and gradients) before a run uses it: a kernel that
disagrees steps aside with the figure. `HONE_VARLEN=0` turns it off (`HONE_FAST=0` too).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import torch.nn.functional as F

from honellm.core import support

NAME = "hone_varlen"
_PACKED = contextvars.ContextVar("hone_varlen_packed", default=False)
# A self-check's allowed disagreement with fp32 per-sequence attention, relative to the reference's largest value:
# bf16 inputs are rounded by up to 2**-9 relative each, which leaves room for the accumulated rounding, while a
# masking or layout error (a token seeing another sequence, heads mixed up) moves values by order one.
TOLERANCE = 0.02


def usable(model, device, compute_dtype: torch.dtype | None, *, static: bool = False) -> str | None:
    """Why a packed run of `model` (or of a model with this config) on `device` cannot take `hone_varlen` (None:
    it can): what `support.varlen_problem` says, else the kernel's self-check in this model's attention shape
    (`static`: in the static-shape layout CUDA graphs use, see `self_check`)."""
    found = support.varlen_problem(model, device, compute_dtype)
    if found is not None:
        return found
    config = support.text_config(model)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return self_check(device, compute_dtype or torch.bfloat16, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                      window=support.sliding_window(config), static=static)


def install(model) -> None:
    """Register `hone_varlen` with transformers (once) and make it `model`'s attention implementation."""
    register()
    kernel = support.varlen_kernel()
    if kernel is not None:  # read its signature now: inside compiled layers a first reading would cost a recompile
        support.kernel_parameters(kernel)
    base = support._unwrap(model)
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(NAME)
    else:
        base.config._attn_implementation = NAME


@functools.lru_cache(maxsize=1)
def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, _mask)


@contextlib.contextmanager
def packed_forward():
    """While active, a forward under `hone_varlen` is a packed one: transformers builds no attention mask for it
    (the varlen kernel needs the cumulative lengths instead, and a [row x row] block-diagonal mask would be built
    for nothing)."""
    token = _PACKED.set(True)
    try:
        yield
    finally:
        _PACKED.reset(token)


def _mask(*args, **kwargs):
    """The attention mask transformers builds for `hone_varlen`: none for a packed forward, sdpa's otherwise."""
    if _PACKED.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              sliding_window: int | None = None, softcap: float | None = None, is_causal: bool | None = None,
              s_aux=None, **kwargs):
    """transformers' attention-function contract (query/key/value [B, heads, T, head_dim]; returns
    ([B, T, heads, head_dim], None)): the varlen kernel where the cumulative lengths came with the call, sdpa
    otherwise."""
    cu_q, cu_k = kwargs.pop("cu_seq_lens_q", None), kwargs.pop("cu_seq_lens_k", None)
    max_q, max_k = kwargs.pop("max_length_q", None), kwargs.pop("max_length_k", None)
    if cu_q is None:
        if _PACKED.get():  # no mask was built for this call: sdpa would attend across the whole row
            raise RuntimeError("a packed forward under hone_varlen came without cu_seq_lens_q (the cumulative "
                               "lengths training.logprobs.packed_inputs passes)")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, softcap=softcap, **kwargs)
    if softcap is not None or s_aux is not None or (dropout and module.training):
        raise RuntimeError("hone_varlen has no soft-capping, attention sinks or attention dropout "
                           "(honellm.core.support.varlen_problem steps aside for them)")
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        raise RuntimeError("hone_varlen computes causal attention only")
    out = varlen(query, key, value, cu_q, cu_q if cu_k is None else cu_k, max_q, max_k if max_k else max_q,
                 scale=scaling, window=sliding_window)
    return out, None


def varlen(query, key, value, cu_q, cu_k, max_q: int | None, max_k: int | None, *, scale: float | None = None,
           window: int | None = None) -> torch.Tensor:
    """Causal attention of the sequences laid out by `cu_q`/`cu_k` in the flattened rows of query/key/value
    ([B, heads, T, head_dim], transformers' layout), returned as [B, T, heads, head_dim]. `window`: each token
    sees itself and the `window - 1` tokens before it (transformers' `sliding_window`)."""
    kernel = support.varlen_kernel()
    batch, heads, length, head_dim = query.shape
    q, k, v = (t.transpose(1, 2).flatten(0, 1) for t in (query, key, value))  # [B*T, heads, head_dim]
    if torch.is_autocast_enabled(q.device.type):  # the dtype sdpa would have computed in under autocast
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    v_dim = v.shape[-1]
    if v_dim != head_dim:  # value heads narrower than query heads (MLA): padded, the output cropped
        v = F.pad(v, (0, head_dim - v_dim))
    cu_q, cu_k = cu_q.to(device=q.device, dtype=torch.int32), cu_k.to(device=q.device, dtype=torch.int32)
    if max_q is None:  # (transformers' flash path passes both; computing them waits for the device)
        max_q = int((cu_q[1:] - cu_q[:-1]).max())
    if max_k is None:
        max_k = int((cu_k[1:] - cu_k[:-1]).max())
    params = support.kernel_parameters(kernel)
    options: dict = {}
    scale = scaling_of(scale, head_dim)
    if "scale" in params:
        options["scale"] = scale
    elif scale != head_dim ** -0.5:  # a kernel without the argument scales by 1/sqrt(head_dim)
        q = q * (scale * head_dim ** 0.5)
    if k.shape[1] != heads:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    if "window_size" in params:
        options["window_size"] = (window - 1, 0) if window and window < max(int(max_q), int(max_k)) else (-1, 0)
    else:
        options["is_causal"] = True
    out = kernel(q, k, v, cu_q, cu_k, int(max_q), int(max_k), **options)
    return out[..., :v_dim].reshape(batch, length, heads, v_dim)


def scaling_of(scale: float | None, head_dim: int) -> float:
    return float(scale) if scale is not None else head_dim ** -0.5


# ------------------------------------------------------------------------------------------------ self-check


def self_check(device, dtype: torch.dtype, *, heads: int = 4, kv_heads: int = 2, head_dim: int = 64,
               window: int | None = None, static: bool = False) -> str | None:
    """Run the kernel on three random sequences (forward and backward) against per-sequence fp32 attention on the
    same device; None when they agree within `TOLERANCE` (relative to the reference's largest value), else the
    reason with the figure. `static`: laid out as `batching.pack` lays out a static-shape row for CUDA graphs
    (empty sequences at the end, the whole row's length as the longest). Cached per setting: a run pays it once
    (milliseconds on a GPU)."""
    return _self_check(str(torch.device(device)), dtype, heads, kv_heads, head_dim, window, static)


@functools.cache
def _self_check(device: str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                window: int | None, static: bool = False) -> str | None:
    lengths = [37, 5, 90] if window is None else [37, 5, max(90, 2 * window)]
    generator = torch.Generator(device="cpu").manual_seed(0)
    total = sum(lengths)
    longest = total if static else max(lengths)
    if static:
        lengths += [0, 0]

    def draw(n: int) -> torch.Tensor:
        return torch.randn(1, n, total, head_dim, generator=generator).to(device)

    # The layouts a transformers attention layer hands over: query and key contiguous [1, heads, T, d] (rotary's
    # output), value a transposed view of its projection's [1, T, heads, d].
    query, key = draw(heads), draw(kv_heads)
    value = torch.randn(1, total, kv_heads, head_dim, generator=generator).to(device).transpose(1, 2)
    grad = torch.randn(1, total, heads, head_dim, generator=generator).to(device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    try:
        inputs = [t.to(dtype).requires_grad_() for t in (query, key, value)]
        out = varlen(*inputs, cu, cu, longest, longest, window=window)
        out.backward(grad.to(dtype))
        got = [out.detach().float(), *(t.grad.float() for t in inputs)]
    except Exception as error:  # a kernel that does not run here steps aside with what it said
        return f"torch's varlen attention failed its self-check: {type(error).__name__}: {error}"[:300]
    inputs = [t.requires_grad_() for t in (query, key, value)]
    out = reference(*inputs, cu, window=window)
    out.backward(grad)
    want = [out.detach(), *(t.grad for t in inputs)]
    for name, a, b in zip(("output", "query gradient", "key gradient", "value gradient"), got, want, strict=True):
        error = float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
        if not error <= TOLERANCE:
            return (f"torch's varlen attention disagrees with per-sequence attention on this device ({name}: "
                    f"{error:.3g} of its largest value, tolerance {TOLERANCE})")
    return None


def reference(query, key, value, cu, *, scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """The same function computed plainly: each sequence's causal (sliding-window) attention on its own, by
    sdpa with an explicit mask, in the inputs' dtype. Shapes as `varlen`'s ([1, heads, T, d] -> [1, T, heads, d])."""
    heads, head_dim = query.shape[1], query.shape[-1]
    groups = heads // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    pieces = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        n = end - start
        if n == 0:
            continue
        i = torch.arange(n, device=query.device)
        allowed = i[None, :] <= i[:, None]
        if window:
            allowed &= i[:, None] - i[None, :] < window
        pieces.append(F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], attn_mask=allowed,
            scale=scaling_of(scale, head_dim)))
    return torch.cat(pieces, dim=2).transpose(1, 2)
