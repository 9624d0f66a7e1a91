"""Model runners: one forward pass over a batch, writing into and attending over a per-batch KV cache.

The engine drives every model through the same five calls: `new_state`, `forward`, `compute_prefix`,
`load_prefix` and `select`, between `prepare` and `finish` at the start and end of each engine call. Two runners implement them:

- `DecoderRunner` (Llama, Mistral, Qwen2, Qwen3 and their fine-tunes, which covers SmolLM2, wherever
  `honellm.core.support.fast_path_support` says `decoding`): a lean forward
  that reads the model's own modules and writes keys and values into preallocated buffers. It exists for speed:
  transformers' forward spends more time in Python (decorators, mask construction, cache bookkeeping) than in
  arithmetic for a 135M model at batch 1. Every linear layer that is not a plain `nn.Linear` (a PEFT LoRA layer,
  for instance) is called as a module, so adapters work unchanged; modules are looked up on every forward, so
  adapters injected later, or weights updated in place by an optimizer, are always seen.
  For plain layers it also keeps a derived copy of the weights: q|k|v and gate|up concatenated (fewer, larger
  matrix products) and, for bf16 on a CPU, packed: into AMX tiles for Hone's own kernel where the CPU has AMX
  (`honellm/core/native.py`, every row count), else into oneDNN's blocked layout (the reorder a bf16 matmul otherwise
  repeats on every call), with a row-major copy for one-row products (batch-1 decoding), read by a
  matrix-vector product (`native.mv`: a compiled kernel where it builds, else `torch.mv`) that streams the weight
  at memory speed (the model's own weight where no concatenation is needed). A PEFT LoRA layer (plain LoRA, one
  active adapter) enters that copy merged, W + scaling * B @ A computed in fp32 and rounded once, so an adapted
  model decodes about as fast as its base (PEFT's unmerged forward costs three more products and two passes per
  layer: SST-2 evaluation of a LoRA artifact ran at 3.86 examples/s unmerged, 5.66 merged, the base model at
  6.80). A PEFT DoRA layer (one active adapter) enters it merged the same way, with PEFT's DoRA merge
  (m / ||W + scaling * B @ A|| per output row, times W + scaling * B @ A; fp32, rounded once): its unmerged forward
  recomputes that norm over the whole weight at every call of every layer, for every decoded token.
  See `DerivedWeights` for when those copies are rebuilt.
- `HFRunner`, for every other architecture: the model's own forward with a `DynamicCache`, a 2D attention mask
  and explicit position ids.

Slot layout of a batch (both runners). A cache has `capacity` slots per row; slot s of row i holds one token:

    [ shared prefix (P slots) | pad ... pad  suffix_i | generated tokens ... ]
      same for every row        right-aligned suffixes   one slot per step

The prefix is computed once at batch size 1 and copied (broadcast) into slots [0, P) of every row; each row's
own prompt tokens are right-aligned after it, so that all rows end at the same slot and decode in lockstep. The
pad slots between the prefix and a shorter suffix are masked out of attention for every query, and position ids
are counted over real tokens only (a suffix token at slot s of row i has position s - pad_i), so each row sees
exactly the positions and keys it would see alone. Without a prefix (P = 0) this is plain left padding, with the
position ids `model.generate` uses.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from honellm.core import native, support, varlen
from honellm.core.fused import dora_parts, lora_parts

# Norm classes computed as `weight * normalize(x.float()).to(dtype)`, the Llama RMSNorm.
RMSNORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The causal LM that actually runs: PEFT injects LoRA-style layers into the base model in place, so the base
    model's forward already applies the active adapters. Prompt-learning adapters (prompt or prefix tuning) add
    virtual tokens in `PeftModel.forward` instead, which this engine does not reproduce."""
    if not hasattr(model, "get_base_model") or not hasattr(model, "peft_config"):
        return model
    config = model.peft_config.get(getattr(model, "active_adapter", "default"))
    if config is not None and getattr(config, "is_prompt_learning", False):
        from honellm.errors import HoneError

        raise HoneError(
            f"the generation engine does not support prompt-learning adapters ({config.peft_type})",
            where="Generator(model=...)",
            fix="use a LoRA-family adapter, or call model.generate() for this model",
        )
    return model.get_base_model()


def make_runner(model: nn.Module, *, merge_adapters: bool = True):
    """The fastest runner that is exact for this model (`merge_adapters`: see `DerivedWeights`): the lean one where
    `honellm.core.support` says decoding takes the fast path, else transformers' own forward."""
    base = unwrap_peft(model)
    if DecoderRunner.unsupported(base) is None:
        return DecoderRunner(base, merge_adapters=merge_adapters)
    return HFRunner(base)


# ---------------------------------------------------------------------------------------------------- lean runner

DERIVED_MEMORY_SHARE = 0.25  # derived weights may take at most this share of the machine's memory
# On a GPU: at most this share of the memory free when they are built (the trainer's, between rollouts).
DERIVED_GPU_SHARE = 0.5
FINGERPRINT_PROBES = 16  # elements compared per weight to notice `.data` writes, which bump no version counter


@dataclass
class DerivedWeight:
    """One derived matrix in the layouts its products want. Where the native AMX kernels run (bf16 on a CPU with
    AMX, see `native`), `tiles` alone serves every row count. Elsewhere `blocked` serves many rows (oneDNN's
    prepacked layout for bf16 on a CPU, else row-major) and `rows`, row-major, a one-row product (`native.mv`);
    `rows` may be the module's own weight or `blocked` itself, and is None where no row-major copy was
    affordable."""

    blocked: torch.Tensor | None
    rows: torch.Tensor | None
    tiles: native.Tiles | None = None


@dataclass
class LayerWeights:
    """One decoder layer's derived weights (None where a module is neither a plain nn.Linear nor a LoRA layer
    that can be merged: that module then runs its own forward)."""

    qkv: DerivedWeight | None
    qkv_bias: torch.Tensor | None
    o: DerivedWeight | None
    gate_up: DerivedWeight | None
    down: DerivedWeight | None


class DerivedWeights:
    """Fused (and, for bf16 on CPU, prepacked) copies of a model's linear weights (LoRA and DoRA layers merged).

    A copy can go stale when the model is trained between calls. `refresh` runs at the start of every engine call
    and rebuilds the copy unless every source weight still has the same storage, the same version counter (which
    every in-place update through autograd-visible ops bumps: optimizers, `load_state_dict`) and the same values
    at a few fixed positions (which catches writes through `.data`, such as PEFT's adapter merging, that bump no
    counter). Rebuilding costs one copy of the weights, tens of milliseconds for a 135M model (0.3-0.4 s when LoRA
    layers are merged in).

    `merge_adapters=False` leaves LoRA and DoRA layers to their own forward (slower per token) instead of merging
    them: for a model whose active adapter changes from call to call (a server switching adapters), where every switch
    would otherwise rebuild the copy.

    On a GPU the copies are row-major (no packing) and serve what they serve on a CPU: a decoding step of a small
    model there is bound by the host launching kernels, and a LoRA policy's rollouts (GRPO's) launched each adapted
    layer's own products instead of one merged product per group (a step of the 135M shape with LoRA on every linear
    layer: 3,201 operations unmerged, 1,191 merged, counted on a CPU). They are built only where they fit in half
    of the GPU memory free at the time, and `DecoderRunner.finish` gives them back after each engine call while the
    model is being trained (the trainer needs that memory; the next call rebuilds them from the new weights anyway).
    """

    def __init__(self, model: nn.Module, *, merge_adapters: bool = True):
        self.model = model
        self.merge_adapters = merge_adapters
        self.layers: list[LayerWeights] | None = None  # None: not built (yet), use the modules
        self.lm_head: DerivedWeight | None = None
        self.signature: list | None = None
        self.gpu = _on_gpu(model.get_output_embeddings().weight.device)  # the GPU policy: see the class docstring
        self.enabled, self.row_copies = self._affordable()

    def _affordable(self) -> tuple[bool, bool]:
        """(derived weights at all, row-major copies of the concatenated ones as well) within the memory share."""
        if self.gpu:  # whether they fit is decided at each build (`_fits`)
            return True, False
        weights = self._linear_weights()
        if not weights or weights[0].device.type != "cpu":
            return False, False
        needed = sum(w.numel() * w.element_size() for w in weights)
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return False, False
        # Row-major forms that are a second copy when packed: the concatenations and any merged LoRA layer; at
        # most one more copy of the layers' weights (adapters injected later change no shape).
        extra = 0
        if _PACKING and weights[0].dtype == torch.bfloat16:
            extra = sum(_base(m).weight.numel() * _base(m).weight.element_size()
                        for layer in self.model.model.layers for m in self._sources(layer))
        return needed <= DERIVED_MEMORY_SHARE * total, needed + extra <= DERIVED_MEMORY_SHARE * total

    @staticmethod
    def _sources(layer) -> list[nn.Module]:
        attn, mlp = layer.self_attn, layer.mlp
        return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]

    def _signature(self) -> list:
        """What the derived weights were built from: each source's identity, version and shape, and the values at a
        few positions: on a CPU one small copy per weight, on a GPU all of them gathered into one tensor per dtype
        (one copy, and in `_same_signature` one wait for the device per dtype, not one per weight)."""
        signature, gathered = [], {}
        modules = [m for layer in self.model.model.layers for m in self._sources(layer)]
        modules.append(self.model.get_output_embeddings())
        for module in modules:
            lora = _mergeable_lora(module) if self.merge_adapters else None
            if type(module) is not nn.Linear and lora is None:
                signature.append(type(module))
                continue
            # a DoRA layer's magnitude vector (lora[4]) is one of its tensors: an optimizer step on it refreshes too
            tensors = [module.weight, module.bias] if lora is None else [lora[0].weight, lora[0].bias, *lora[1:3], lora[4]]
            if lora is not None:
                signature.append(_lora_state(module, lora[3], dora=lora[4] is not None))
            for tensor in tensors:
                if tensor is None:
                    continue
                flat = tensor.detach().reshape(-1)
                probes = flat[:: max(1, flat.numel() // FINGERPRINT_PROBES)][:FINGERPRINT_PROBES]
                entry = (tensor.data_ptr(), tensor._version, tensor.dtype, tuple(tensor.shape))
                if self.gpu:
                    gathered.setdefault(tensor.dtype, []).append(probes)
                    signature.append(entry)
                else:
                    signature.append((*entry, probes.clone()))
        if gathered:
            signature.append({dtype: torch.cat(views) for dtype, views in gathered.items()})  # copies: a snapshot
        return signature

    def refresh(self) -> None:
        """Rebuild the derived weights if any source changed since the last call (see the class docstring)."""
        if not self.enabled:
            return
        signature = self._signature()
        if self.signature is not None and _same_signature(signature, self.signature):
            return
        self.release()
        if not self._fits():
            return
        self.layers = [self._build(layer) for layer in self.model.model.layers]
        head = self.model.get_output_embeddings()
        found = _effective(head, self.merge_adapters)
        self.lm_head = _derive(found[0], own=found[2] or self.row_copies) if found and found[1] is None else None
        self.signature = signature

    def release(self) -> None:
        """Drop the derived copies: the modules run until the next `refresh` builds them again."""
        self.layers = self.lm_head = self.signature = None

    def _linear_weights(self) -> list[torch.Tensor]:
        return [m.weight for m in self.model.modules() if type(m) is nn.Linear]

    def _fits(self) -> bool:
        """On a GPU, whether a copy of every derived weight fits in `DERIVED_GPU_SHARE` of the memory free now
        (with what PyTorch's allocator holds unused); on a CPU, `_affordable` decided it once."""
        if not self.gpu:
            return True
        weights = self._linear_weights()
        device = weights[0].device
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return sum(w.numel() * w.element_size() for w in weights) <= DERIVED_GPU_SHARE * free

    def _build(self, layer) -> LayerWeights:
        sources = self._sources(layer)
        # (weight, bias, is the module's own weight) for each derivable module, else None
        found = [_effective(m, self.merge_adapters) for m in sources]
        (q, k, v, o, gate, up, down) = found
        qkv = qkv_bias = gate_up = None
        if q and k and v:
            qkv = _derive(torch.cat([q[0], k[0], v[0]]), own=self.row_copies)
            if q[1] is not None and k[1] is not None and v[1] is not None:
                qkv_bias = torch.cat([q[1], k[1], v[1]]).detach()
            elif not (q[1] is None and k[1] is None and v[1] is None):
                qkv = None  # mixed biases: leave this layer to the modules
        if gate and up and gate[1] is None and up[1] is None:
            gate_up = _derive(torch.cat([gate[0], up[0]]), own=self.row_copies)

        def single(found):
            if not found or found[1] is not None:
                return None
            return _derive(found[0], own=found[2] or self.row_copies)

        return LayerWeights(qkv, qkv_bias, single(o), gate_up, single(down))


def _base(module: nn.Module) -> nn.Module:
    """The linear layer under a PEFT tuner layer (the module itself otherwise)."""
    return getattr(module, "base_layer", module)


def _mergeable_lora(module: nn.Module):
    """`(base, lora_A weight, lora_B weight, scaling, magnitude)` when `module` is a PEFT LoRA `Linear` whose output
    is exactly `base(x) + scaling * B @ A @ x` (magnitude None; see `honellm.core.fused.lora_parts`) or a DoRA one
    whose output is exactly `m / ||W + scaling * B @ A|| * (W + scaling * B @ A) @ x + b` (magnitude: DoRA's `m`,
    see `honellm.core.fused.dora_parts`); `(base, None, None, 0.0, None)` when its output is just `base(x)`
    (adapters disabled, merged into the base already, or none active); None when it is anything else (other
    variants, several adapters, DoRA with dropout in training mode, quantized bases ...)."""
    if not hasattr(module, "lora_A") or type(getattr(module, "base_layer", None)) is not nn.Linear:
        return None
    if module.disable_adapters or module.merged or not any(a in module.lora_A for a in module.active_adapters):
        return module.base_layer, None, None, 0.0, None
    parts, magnitude = lora_parts(module), None
    if parts is None:
        dora = dora_parts(module)
        if dora is None:
            return None
        parts, magnitude = dora[:5], dora[5]
    _, base, lora_a, lora_b, scaling = parts
    return base, lora_a.weight, lora_b.weight, scaling, magnitude


def _lora_state(module: nn.Module, scaling: float, *, dora: bool = False) -> str:
    """What decides a LoRA layer's function besides its tensors (which adapter, merged, disabled, the scaling,
    whether it is DoRA)."""
    return (f"{'dora' if dora else 'lora'} {list(module.active_adapters)} merged={module.merged} "
            f"disabled={module.disable_adapters} x{scaling!r}")


def _effective(module: nn.Module, merge: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, bool] | None:
    """`(weight, bias, is the module's own tensor)` of the linear map `module` computes, or None when it is not
    one: a plain `nn.Linear`'s own weight, or (`merge`) a LoRA layer merged (W + scaling * B @ A, in fp32, rounded
    once to W's dtype, the arithmetic of PEFT's `merge`), or a DoRA layer merged the way PEFT's DoRA `merge` does
    it (`m / ||W + scaling * B @ A||`, the norm over each output row, times W + scaling * B @ A; in fp32, rounded
    once). Folded, DoRA costs what LoRA costs per token: its unmerged forward recomputes that norm over the whole
    weight in every call of every layer."""
    if type(module) is nn.Linear:
        return module.weight.detach(), None if module.bias is None else module.bias.detach(), True
    lora = _mergeable_lora(module) if merge else None
    if lora is None:
        return None
    base, lora_a, lora_b, scaling, magnitude = lora
    weight, bias = base.weight.detach(), None if base.bias is None else base.bias.detach()
    if lora_a is None:
        return weight, bias, True
    delta = (lora_b.detach().float() @ lora_a.detach().float()).mul_(scaling)
    merged = weight.float() + delta
    if magnitude is not None:  # DoRA: PEFT's dora_factor = m / weight_norm, times (W + delta); the bias unchanged
        weight_norm = torch.linalg.norm(merged, dim=1)
        merged = (magnitude.detach().float() / weight_norm).view(-1, 1) * merged
    return merged.to(weight.dtype), bias, False


def _on_gpu(device: torch.device) -> bool:
    """Whether derived weights follow the GPU policy here (built where they fit in free memory, given back after a
    training model's engine calls); the tests stand a CPU in for a GPU through this."""
    return device.type == "cuda"


def _same_signature(a: list, b: list) -> bool:
    """Whether two `_signature`s match, the probed values bit for bit."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, dict) and isinstance(y, dict):  # a GPU's probes, gathered per dtype
            if x.keys() != y.keys() or not all(torch.equal(x[dtype], y[dtype]) for dtype in x):
                return False
        elif isinstance(x, tuple) and isinstance(y, tuple) and len(x) == len(y) == 5:  # a CPU's, per weight
            if x[:4] != y[:4] or not torch.equal(x[4], y[4]):
                return False
        elif x != y:
            return False
    return True


def _derive(weight: torch.Tensor, *, own: bool) -> DerivedWeight:
    """The layouts of `weight` its products want: AMX tiles where the native kernels run, else oneDNN's blocked
    form and (`own`) a row-major one (for a concatenation, that is the concatenated copy; for a module's weight,
    the weight itself, which costs nothing)."""
    tiles = native.pack(weight) if _PACKING else None
    if tiles is not None:
        return DerivedWeight(None, None, tiles)
    blocked = _pack(weight)
    rows = None
    if not blocked.is_mkldnn:
        rows = blocked
    elif own:
        rows = weight.detach().contiguous()
    return DerivedWeight(blocked, rows)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """A detached copy of `weight`; for bf16 on a CPU with oneDNN, in oneDNN's blocked layout (see `_matmul`)."""
    weight = weight.detach()
    if _PACKING and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
        try:
            return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
        except (RuntimeError, AttributeError):
            pass
    return weight.contiguous()


_PACKING = torch.backends.mkldnn.is_available() and os.environ.get("HONE_GEN_PACK", "1") != "0"


def _matmul(x: torch.Tensor, weight: DerivedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), for a derived weight.

    With AMX tiles, `native.matmul` for any number of rows: decoding streams the weights once, prefetched, at
    0.39-0.48 of oneDNN's time for 1-16 rows and 0.55 for 32 (all of a SmolLM2-135M step's products, paired
    runs), and prefill rows about as fast as oneDNN's (0.92 of its time at 256 rows, 1.03 at 1,024), with the same
    bits as `F.linear` in the cases the tests check.

    Otherwise, one row (batch-1 decoding): a matrix-vector product over the row-major form, which streams the
    weight once: `torch.mv` took 17% less time per decoding step than oneDNN's prepacked product (median of
    paired steps), and `native.mv` (a compiled AVX512-BF16 kernel that prefetches, where it builds) about a
    third less than `torch.mv`. More rows: oneDNN's prepacked linear when the weight was packed. Packed results
    equal `F.linear`'s on the same bf16 inputs (bit for bit at the batch sizes we checked; the tests bound the
    difference); what packing saves is the weight reorder a bf16 matmul otherwise repeats on every call.
    """
    if weight.tiles is not None:
        out = native.matmul(x, weight.tiles)
        return out if bias is None else out + bias
    if weight.rows is not None and x.numel() == x.shape[-1]:
        out = native.mv(weight.rows, x.reshape(-1))
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], out.shape[0])
    if weight.blocked.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight.blocked, bias, "none", [], "")
    return F.linear(x, weight.blocked, bias)


@dataclass
class KVState:
    """Keys and values of one batch: per layer `[batch, kv_heads, capacity, head_dim]`, allocated at first write
    (so their dtype follows the compute dtype, autocast included). `valid[b, s]` is False for padding slots."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    valid: torch.Tensor  # [batch, capacity] bool
    length: int = 0  # slots written so far, the same for every row
    # buffers start at zero: a fixed-shape decoding step (`DecodeGraph`) attends over every slot, the unwritten ones
    # masked out, and a masked slot's value still enters the product (0 x NaN is NaN)
    zeroed: bool = False

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]


class DecoderRunner:
    """The lean forward for Llama-structured decoders (see the module docstring)."""

    name = "decoder"

    def __init__(self, model: nn.Module, *, merge_adapters: bool = True):
        self.model = model
        self.graphs_problem: str | None = None  # why decoding steps are not replayed as CUDA graphs (DecodeGraph)
        self.config = model.config
        self.head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        self.n_layers = self.config.num_hidden_layers
        self.n_heads = self.config.num_attention_heads
        self.n_kv_heads = self.config.num_key_value_heads
        self.gqa = self.n_heads != self.n_kv_heads
        self.derived = DerivedWeights(model, merge_adapters=merge_adapters)

    def prepare(self) -> None:
        """Called at the start of every engine call: bring the derived weights up to date."""
        self.derived.refresh()

    def finish(self) -> None:
        """Called at the end of every engine call: on a GPU, a model with trainable parameters (RL rollouts,
        evaluation during training) gives the derived copies' memory back to its trainer."""
        if (self.derived.layers is not None and self.derived.gpu
                and any(p.requires_grad for p in self.model.parameters())):
            self.derived.release()

    @staticmethod
    def unsupported(model: nn.Module) -> str | None:
        """Why the lean forward cannot run this model exactly, or None when it can."""
        found = support.fast_path_support(model, kernels=False)
        return None if found.decoding else found.reasons["decoding"]

    # ------------------------------------------------------------------------------------------------- states

    def new_state(self, batch: int, capacity: int, *, zeroed: bool = False) -> KVState:
        """An empty cache (`zeroed`: its buffers start at zero, for `DecodeGraph`)."""
        device = self.model.get_output_embeddings().weight.device
        return KVState([None] * self.n_layers, [None] * self.n_layers,
                       torch.zeros(batch, capacity, dtype=torch.bool, device=device), zeroed=zeroed)

    def compute_prefix(self, ids: list[int]) -> KVState:
        """The keys and values of a shared prefix, computed once at batch size 1."""
        device = self.model.get_output_embeddings().weight.device
        state = self.new_state(1, len(ids))
        tokens = torch.tensor([ids], device=device)
        positions = torch.arange(len(ids), device=device)[None]
        self.forward(state, tokens, positions, torch.ones_like(tokens, dtype=torch.bool), keep=1)
        return state

    def load_prefix(self, state: KVState, prefix: KVState) -> None:
        """Copy (broadcast) a prefix into slots [0, P) of every row of a fresh state."""
        length = prefix.length
        for i in range(self.n_layers):
            for store, source in ((state.keys, prefix.keys), (state.values, prefix.values)):
                buffer = self._buffer(state, source[i], store, i)
                buffer[:, :, :length] = source[i][:, :, :length]
        state.valid[:, :length] = True
        state.length = length

    def select(self, state: KVState, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (finished rows are dropped so they stop costing compute)."""
        for store in (state.keys, state.values):
            for i, tensor in enumerate(store):
                if tensor is not None:
                    store[i] = tensor.index_select(0, rows)
        state.valid = state.valid.index_select(0, rows)

    def _buffer(self, state: KVState, like: torch.Tensor, store: list, i: int) -> torch.Tensor:
        if store[i] is None:
            batch = state.valid.shape[0]
            new = torch.zeros if state.zeroed else torch.empty
            store[i] = new(batch, like.shape[1], state.capacity, like.shape[3], dtype=like.dtype, device=like.device)
        return store[i]

    # ------------------------------------------------------------------------------------------------ forward

    def forward(self, state: KVState, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None,
                keep: int, slot: torch.Tensor | None = None) -> torch.Tensor:
        """Run `ids` ([batch, T]) at slots [length, length + T); return logits of the last `keep` slots.

        `positions` are the rotary positions of the new tokens and `valid` marks which of them are real (padding
        is written to its slots too, but no query ever attends to it).

        `slot` (a one-element tensor holding `length`; T = 1, every token real): the decoding step in shapes that do
        not change from step to step, as a CUDA graph replays it (`DecodeGraph`): the step's keys and values are
        written at the slot the tensor names and attention reads every slot of the cache, those not yet written
        masked out like padding. The same values as without it, up to the order of the softmax's sums.
        """
        model = self.model
        core = model.model
        batch, steps = ids.shape
        start, end = state.length, state.length + ids.shape[1]
        if end > state.capacity:
            raise RuntimeError(f"KV cache overflow: {end} slots needed, {state.capacity} allocated")
        if slot is None:
            state.valid[:, start:end] = valid
        else:
            state.valid.index_fill_(1, slot, True)
        hidden = core.embed_tokens(ids)
        cos, sin = core.rotary_emb(hidden, positions)
        cos, sin = cos.unsqueeze(1), _signed_sin(sin.unsqueeze(1))
        mask = self._mask(state, start, end if slot is None else state.capacity, hidden.dtype, single=slot is not None)
        derived = self.derived.layers  # None until `prepare`, or when derived weights are off
        for i, layer in enumerate(core.layers):
            weights = derived[i] if derived is not None else None
            residual = hidden
            x = _norm(layer.input_layernorm, hidden)
            attn = layer.self_attn
            q, k, v = self._qkv(attn, x, weights, batch, steps, cos, sin)
            keys = self._buffer(state, k, state.keys, i)
            values = self._buffer(state, v, state.values, i)
            if slot is None:
                keys[:, :, start:end] = k
                values[:, :, start:end] = v
                keys, values = keys[:, :, :end], values[:, :, :end]
            else:
                keys.index_copy_(2, slot, k)
                values.index_copy_(2, slot, v)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling,
                                                 enable_gqa=self.gqa)
            out = out.transpose(1, 2).reshape(batch, steps, -1)
            if weights is not None and weights.o is not None:
                hidden = residual + _matmul(out, weights.o)
            else:
                hidden = residual + _linear(attn.o_proj, out)
            residual = hidden
            x = _norm(layer.post_attention_layernorm, hidden)
            hidden = residual + self._mlp(layer.mlp, x, weights)
        state.length = end
        hidden = _norm(core.norm, hidden[:, -keep:])
        if derived is not None and self.derived.lm_head is not None:
            return _matmul(hidden, self.derived.lm_head)
        return model.get_output_embeddings()(hidden)

    def _qkv(self, attn, x, weights: LayerWeights | None, batch: int, steps: int, cos, sin):
        """Queries, keys and values [batch, heads, T, head_dim], rotated (`sin` as `_signed_sin` returns it)."""
        if weights is not None and weights.qkv is not None and not hasattr(attn, "q_norm"):
            # One product for q|k|v, one rotation for q|k together.
            qkv = _matmul(x, weights.qkv, weights.qkv_bias).view(batch, steps, -1, self.head_dim).transpose(1, 2)
            split = self.n_heads + self.n_kv_heads
            qk = qkv[:, :split]
            qk = _rotate(qk, cos, sin)
            return qk[:, : self.n_heads], qk[:, self.n_heads:], qkv[:, split:]
        q = _linear(attn.q_proj, x).view(batch, steps, -1, self.head_dim)
        k = _linear(attn.k_proj, x).view(batch, steps, -1, self.head_dim)
        v = _linear(attn.v_proj, x).view(batch, steps, -1, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3 normalizes each head's query and key before the rotation
            q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        return q, k, v

    @staticmethod
    def _mlp(mlp: nn.Module, x: torch.Tensor, weights: LayerWeights | None) -> torch.Tensor:
        if weights is not None and weights.gate_up is not None:
            gate, up = _matmul(x, weights.gate_up).chunk(2, dim=-1)
        else:
            gate, up = _linear(mlp.gate_proj, x), _linear(mlp.up_proj, x)
        hidden = mlp.act_fn(gate) * up
        if weights is not None and weights.down is not None:
            return _matmul(hidden, weights.down)
        return _linear(mlp.down_proj, hidden)

    @staticmethod
    def _mask(state: KVState, start: int, end: int, dtype: torch.dtype, single: bool = False) -> torch.Tensor:
        """Additive attention mask [batch, 1, T, end]: 0 where a query may look (causal, real tokens), else -inf.
        `single`: one query per row that may see every valid slot up to `end` (a fixed-shape decoding step).

        Built once per forward in the compute dtype; a boolean mask would be converted to this inside SDPA in
        every layer. A padding query would see no key at all, and SDPA returns NaN for such a row; the NaN would
        then sit in that slot's keys and values for the next layer. Letting every query see its own slot keeps
        padding finite; no real query ever sees a padding slot.
        """
        allowed = state.valid[:, None, None, :end]
        if end - start > 1 and not single:
            device = state.valid.device
            key_slots = torch.arange(end, device=device)
            query_slots = torch.arange(start, end, device=device)[:, None]
            allowed = (allowed & (key_slots <= query_slots)) | (key_slots == query_slots)
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


class GraphUnavailable(RuntimeError):
    """A decoding step could not be replayed as a CUDA graph here (the engine then decodes eagerly)."""


class DecodeGraph:
    """The decoding steps of one batch replayed as a CUDA graph (`DecoderRunner.forward` with `slot`).

    Why our own: a small model's decoding step on a GPU is bound by the host launching its kernels one by one from
    Python (a 135M step: about a thousand operations); a replay launches the recorded kernels at once. vLLM does
    this and more, where it is installed; the torch engine serves everywhere else (RL rollouts on a GPU without
    vLLM among them). Each step copies the sampled tokens, their positions and the slot into fixed buffers and
    replays. The first step runs eagerly, is recorded (`record`: `torch.cuda.graph`, after a warm-up on a side
    stream), and the recording is replayed once on the same inputs (which rewrites the same slot with the same
    values) and compared with the eager logits: an error or a difference raises `GraphUnavailable`, and the caller
    decodes eagerly. The tests stand an eager re-run in for `record`.
    """

    def __init__(self, runner: DecoderRunner, state: KVState):
        device, batch = state.valid.device, state.valid.shape[0]
        self.runner, self.state = runner, state
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.replay = None
        self.logits: torch.Tensor | None = None  # the recording's output buffer

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [batch, vocab] of `tokens` [batch] at rotary `positions` [batch], written at the next slot."""
        self.ids.copy_(tokens[:, None])
        self.positions.copy_(positions[:, None])
        self.slot.fill_(self.state.length)
        if self.replay is None:
            logits = self._record()
        else:
            self.replay()
            logits = self.logits
        self.state.length += 1
        return logits

    def _run(self) -> torch.Tensor:
        length = self.state.length
        try:
            return self.runner.forward(self.state, self.ids, self.positions, None, keep=1, slot=self.slot)[:, -1]
        finally:
            self.state.length = length  # `step` advances it once the step is done

    def _record(self) -> torch.Tensor:
        eager = self._run().clone()
        try:
            self.logits, replay = self.record(self._run)
            replay()
        except Exception as error:  # noqa: BLE001 - whatever stops the recording, decoding goes on eagerly
            raise GraphUnavailable(f"recording the decoding step failed: {error}") from error
        if not (torch.isfinite(self.logits).all() and torch.allclose(self.logits.float(), eager.float(), rtol=1e-2,
                                                                     atol=1e-2)):
            difference = (self.logits.float() - eager.float()).abs().max().item()
            raise GraphUnavailable(f"the replayed decoding step gave other logits than the eager one (by up to "
                                   f"{difference:.3g})")
        self.replay = replay
        return eager

    @staticmethod
    def record(run) -> tuple[torch.Tensor, object]:
        """`run` recorded as a CUDA graph: (its output, which every replay rewrites; the replay function).

        A warm-up, then the capture, both on a side stream, as `torch.cuda.graph` does it, but without that
        context's `empty_cache()`: it would hand every cached block back to the driver at each batch, and an RL
        trainer would pay for allocating its activations again after every rollout phase."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            run()  # the warm-up
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                out = run()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        return out, graph.replay


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """`sin` with its first half negated, so that `_rotate` needs one `roll` where `rotate_half` takes two slices,
    a negation and a concatenation."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin`, bit for bit: rotate_half(x) * sin = cat(-x2 * s1, x1 * s2) and
    roll(x) * signed_sin = cat(x2 * -s1, x1 * s2), and IEEE products are symmetric in sign. 12 us less per layer
    at batch 1 here (27 -> 15 us)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(module) is nn.Linear:  # the plain case skips nn.Module.__call__ (hooks, dispatch): a few us each
        return F.linear(x, module.weight, module.bias)
    return module(x)  # a PEFT layer (LoRA, DoRA, IA3 ...) or anything else: its own forward


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(module).__name__ in RMSNORM_CLASSES:
        # Llama's RMSNorm, `weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(dtype)`, in 4 ops
        # instead of 8 (the fused kernel normalizes in fp32 like the original).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=module.variance_epsilon)
        return module.weight * normed.to(x.dtype)
    return module(x)


# ------------------------------------------------------------------------------------------------------ HF runner


@dataclass
class HFState:
    cache: object  # a transformers Cache
    mask: torch.Tensor  # [batch, capacity] long: 1 for real tokens, 0 for padding
    length: int = 0
    positions: torch.Tensor | None = None  # [batch, capacity] long, -1 for padding: where masks are built here

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]


class HFRunner:
    """Any causal LM through its own forward; slower, but exact wherever transformers is.

    A model with sliding-window attention gets its attention masks from here (`windows`): transformers measures a
    window in cache slots, and the engine's slot layout puts padding between a shared prefix and a shorter
    suffix, so transformers' own mask would let a query see fewer real tokens than the window holds (0.2-0.5 nats
    on choice log-likelihoods, issue 17). Here the window is measured in each row's own positions, which gives
    every row exactly what it sees alone; the cache then keeps every slot (no sliding-window layers). Where the
    attention implementation takes no prepared mask (flash, flex), the runner reuses no prefix (`reuses_prefix`):
    left padding alone keeps slots and positions in step."""

    name = "transformers"

    def __init__(self, model: nn.Module):
        self.model = model
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`; accept either.
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keeps_logits = "logits_to_keep" in params
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.windows = attention_windows(config)
        self.implementation = getattr(config, "_attn_implementation", None)
        custom = bool(self.windows) and self.implementation in ("eager", "sdpa", varlen.NAME)  # varlen: sdpa here
        self.reuses_prefix = self.windows is None or custom
        if not custom:
            self.windows = None
        self.eager = False  # compiled layers run eagerly (set at each engine call: `prepare`)

    def prepare(self) -> None:
        """Nothing to bring up to date (the model's own forward reads its weights); whether layers are compiled."""
        self.eager = support.compiled(self.model)

    def finish(self) -> None:
        """Nothing held between calls."""

    def new_state(self, batch: int, capacity: int, *, zeroed: bool = False) -> HFState:
        """An empty cache (`zeroed` is the lean runner's; a DynamicCache holds only what was written)."""
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        mask = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        if self.windows is None:
            return HFState(DynamicCache(config=self.model.config), mask)
        # Without the config every layer keeps all its slots: the masks below decide what each query sees.
        return HFState(DynamicCache(), mask, positions=torch.full_like(mask, -1))

    def compute_prefix(self, ids: list[int]) -> HFState:
        device = next(self.model.parameters()).device
        state = self.new_state(1, len(ids))
        tokens = torch.tensor([ids], device=device)
        positions = torch.arange(len(ids), device=device)[None]
        self.forward(state, tokens, positions, torch.ones_like(tokens, dtype=torch.bool), keep=1)
        return state

    def load_prefix(self, state: HFState, prefix: HFState) -> None:
        batch = state.mask.shape[0]
        state.cache = copy.deepcopy(prefix.cache)
        if batch > 1:
            state.cache.batch_repeat_interleave(batch)
        state.mask[:, : prefix.length] = 1
        if state.positions is not None:
            state.positions[:, : prefix.length] = prefix.positions[:, : prefix.length]
        state.length = prefix.length

    def select(self, state: HFState, rows: torch.Tensor) -> None:
        state.cache.batch_select_indices(rows)
        state.mask = state.mask.index_select(0, rows)
        if state.positions is not None:
            state.positions = state.positions.index_select(0, rows)

    def forward(self, state: HFState, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                keep: int) -> torch.Tensor:
        start, end = state.length, state.length + ids.shape[1]
        state.mask[:, start:end] = valid.long()
        kwargs = {self.cache_arg: state.cache}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = keep
        attention_mask = state.mask[:, :end]
        if state.positions is not None:
            state.positions[:, start:end] = torch.where(valid, positions, -1)
            attention_mask = self._masks(state, start, end)
        # Layers a training recipe compiled (compile=true) run eagerly here: compiled for the training batches,
        # they would recompile for every cache length and see a cache object per step. (The stance costs ~0.1 ms
        # to enter: only where a layer is compiled.)
        with torch.compiler.set_stance("force_eager") if self.eager else contextlib.nullcontext():
            out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                             **kwargs)
        state.length = end
        return out.logits[:, -keep:]

    def _masks(self, state: HFState, start: int, end: int):
        """The attention masks [batch, 1, T, end] of queries in slots [start, end): a key is seen when it is real,
        at or before the query's position and (in a windowed layer) within the window, counted in positions as
        transformers counts them without padding (`kv > q - window`). A padding query sees its own slot only
        (a row of nothing would be NaN). One mask per layer type (a dict) where the config names layer types,
        else the one the model's layers use; boolean for sdpa, additive for eager, as transformers builds them."""
        queries = state.positions[:, None, start:end, None]  # [B, 1, T, 1]
        keys = state.positions[:, None, None, :end]  # [B, 1, 1, S]
        seen = (keys >= 0) & (keys <= queries)
        own = torch.arange(end, device=keys.device) == torch.arange(start, end, device=keys.device)[:, None]
        dtype = self.model.get_input_embeddings().weight.dtype
        masks = {}
        for kind, window in self.windows.items():
            allowed = seen if window is None else seen & (keys > queries - window)
            allowed = allowed | own
            if self.implementation == "eager":
                masks[kind] = torch.zeros(allowed.shape, dtype=dtype, device=keys.device).masked_fill_(
                    ~allowed, torch.finfo(dtype).min)
            else:
                masks[kind] = allowed
        return masks if len(masks) > 1 or "" not in masks else masks[""]


def attention_windows(config) -> dict[str, int | None] | None:
    """The attention window of each layer type, for a model with sliding-window attention (None when every layer
    attends to the whole context; {} when a layer type is one this module builds no masks for, such as chunked
    attention): keyed by the config's layer types ("full_attention", "sliding_attention"), or by "" where the
    config names none and every layer uses the window (Mistral)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        kinds = set(layer_types)
        if kinds == {"full_attention"} or window is None:
            return None
        if not kinds <= {"full_attention", "sliding_attention"}:
            return {}
        return {kind: (window if kind == "sliding_attention" else None) for kind in sorted(kinds)}
    if window is None or not getattr(config, "use_sliding_window", True):
        return None
    return {"": window}
