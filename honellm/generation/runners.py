"""Model runners: one forward pass over a batch, writing into and attending over a per-batch KV cache.

The engine drives every model through the same five calls: `new_state`, `forward`, `compute_prefix`,
`load_prefix` and `select`. Two runners implement them:

- `DecoderRunner` (Llama, Mistral, Qwen2, Qwen3 and their fine-tunes, which covers SmolLM2): a lean forward
  that reads the model's own modules and writes keys and values into preallocated buffers. It exists for speed:
  transformers' forward spends more time in Python (decorators, mask construction, cache bookkeeping) than in
  arithmetic for a 135M model at batch 1. Every linear layer that is not a plain `nn.Linear` (a PEFT LoRA layer,
  for instance) is called as a module, so adapters work unchanged; modules are looked up on every forward, so
  adapters injected later, or weights updated in place by an optimizer, are always seen.
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

import copy
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Model types whose decoder layer has the Llama structure (pre-norm, rotary q/k, SDPA, gated MLP).
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}
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


def make_runner(model: nn.Module):
    """The fastest runner that is exact for this model."""
    base = unwrap_peft(model)
    if DecoderRunner.unsupported(base) is None:
        return DecoderRunner(base)
    return HFRunner(base)


# ---------------------------------------------------------------------------------------------------- lean runner


@dataclass
class KVState:
    """Keys and values of one batch: per layer `[batch, kv_heads, capacity, head_dim]`, allocated at first write
    (so their dtype follows the compute dtype, autocast included). `valid[b, s]` is False for padding slots."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    valid: torch.Tensor  # [batch, capacity] bool
    length: int = 0  # slots written so far, the same for every row

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]


class DecoderRunner:
    """The lean forward for Llama-structured decoders (see the module docstring)."""

    name = "decoder"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        self.n_layers = self.config.num_hidden_layers
        self.gqa = self.config.num_attention_heads != self.config.num_key_value_heads

    @staticmethod
    def unsupported(model: nn.Module) -> str | None:
        """Why the lean forward cannot run this model exactly, or None when it can."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in LLAMA_LIKE:
            return f"model type {getattr(config, 'model_type', None)!r} is not one of {sorted(LLAMA_LIKE)}"
        if getattr(config, "hidden_act", "silu") != "silu":
            return "activation is not silu"
        if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
            return "sliding-window attention"
        layer_types = getattr(config, "layer_types", None)
        if layer_types and any(t != "full_attention" for t in layer_types):
            return "layer types other than full attention"
        core = getattr(model, "model", None)
        if core is None or not all(hasattr(core, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return "not the <Model>ForCausalLM(model=<Model>Model) layout"
        if model.get_output_embeddings() is None:
            return "no output embeddings"
        for layer in core.layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if attn is None or mlp is None or not all(
                hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")
            ):
                return "a decoder layer without q/k/v/o projections"
            if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                return "a decoder layer without a gated MLP"
        return None

    # ------------------------------------------------------------------------------------------------- states

    def new_state(self, batch: int, capacity: int) -> KVState:
        device = self.model.get_output_embeddings().weight.device
        return KVState([None] * self.n_layers, [None] * self.n_layers,
                       torch.zeros(batch, capacity, dtype=torch.bool, device=device))

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
            store[i] = torch.empty(batch, like.shape[1], state.capacity, like.shape[3], dtype=like.dtype,
                                   device=like.device)
        return store[i]

    # ------------------------------------------------------------------------------------------------ forward

    def forward(self, state: KVState, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                keep: int) -> torch.Tensor:
        """Run `ids` ([batch, T]) at slots [length, length + T); return logits of the last `keep` slots.

        `positions` are the rotary positions of the new tokens and `valid` marks which of them are real (padding
        is written to its slots too, but no query ever attends to it).
        """
        model = self.model
        core = model.model
        batch, steps = ids.shape
        start, end = state.length, state.length + ids.shape[1]
        if end > state.capacity:
            raise RuntimeError(f"KV cache overflow: {end} slots needed, {state.capacity} allocated")
        state.valid[:, start:end] = valid
        hidden = core.embed_tokens(ids)
        cos, sin = core.rotary_emb(hidden, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask = self._mask(state, start, end)
        for i, layer in enumerate(core.layers):
            residual = hidden
            x = _norm(layer.input_layernorm, hidden)
            attn = layer.self_attn
            q = _linear(attn.q_proj, x).view(batch, steps, -1, self.head_dim)
            k = _linear(attn.k_proj, x).view(batch, steps, -1, self.head_dim)
            v = _linear(attn.v_proj, x).view(batch, steps, -1, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalizes each head's query and key before the rotation
                q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys = self._buffer(state, k, state.keys, i)
            values = self._buffer(state, v, state.values, i)
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            out = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask,
                                                 scale=attn.scaling, enable_gqa=self.gqa)
            out = out.transpose(1, 2).reshape(batch, steps, -1)
            hidden = residual + _linear(attn.o_proj, out)
            residual = hidden
            x = _norm(layer.post_attention_layernorm, hidden)
            hidden = residual + _mlp(layer.mlp, x)
        state.length = end
        hidden = _norm(core.norm, hidden[:, -keep:])
        return model.get_output_embeddings()(hidden)

    @staticmethod
    def _mask(state: KVState, start: int, end: int) -> torch.Tensor:
        """Boolean attention mask [batch, 1, T, end]: causal, minus padding slots.

        A padding query would see no key at all, and SDPA returns NaN for such a row; the NaN would then sit in
        that slot's keys and values for the next layer. Letting every query see its own slot keeps padding finite;
        no real query ever sees a padding slot.
        """
        valid = state.valid[:, None, None, :end]
        if end - start == 1:
            return valid
        device = state.valid.device
        key_slots = torch.arange(end, device=device)
        query_slots = torch.arange(start, end, device=device)[:, None]
        causal = key_slots <= query_slots
        return (valid & causal) | (key_slots == query_slots)


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(module) is nn.Linear:  # the plain case skips nn.Module.__call__ (hooks, dispatch): a few us each
        return F.linear(x, module.weight, module.bias)
    return module(x)  # a PEFT layer (LoRA, DoRA, IA3 ...) or anything else: its own forward


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(module).__name__ in RMSNORM_CLASSES:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return module.weight * x.to(dtype)
    return module(x)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ------------------------------------------------------------------------------------------------------ HF runner


@dataclass
class HFState:
    cache: object  # a transformers Cache
    mask: torch.Tensor  # [batch, capacity] long: 1 for real tokens, 0 for padding
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]


class HFRunner:
    """Any causal LM through its own forward; slower, but exact wherever transformers is."""

    name = "transformers"

    def __init__(self, model: nn.Module):
        self.model = model
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`; accept either.
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keeps_logits = "logits_to_keep" in params

    def new_state(self, batch: int, capacity: int) -> HFState:
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        return HFState(DynamicCache(config=self.model.config),
                       torch.zeros(batch, capacity, dtype=torch.long, device=device))

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
        state.length = prefix.length

    def select(self, state: HFState, rows: torch.Tensor) -> None:
        state.cache.batch_select_indices(rows)
        state.mask = state.mask.index_select(0, rows)

    def forward(self, state: HFState, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                keep: int) -> torch.Tensor:
        start, end = state.length, state.length + ids.shape[1]
        state.mask[:, start:end] = valid.long()
        kwargs = {self.cache_arg: state.cache}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids=ids, attention_mask=state.mask[:, :end], position_ids=positions, use_cache=True,
                         **kwargs)
        state.length = end
        return out.logits[:, -keep:]
