"""Process setup for a training recipe: the accelerator (one process, DDP or FSDP) and seeds.

The same recipe code runs as `hone tune ...` (one process), under `accelerate launch` (DDP, or FSDP from the
user's accelerate config) and under `torchrun`. On a machine without CUDA the processes talk over gloo.
Mixed precision is not delegated to accelerate: `Precision` (frozen bf16, trainable fp32, autocast) applies
the same policy on CPU and GPU, which accelerate's fp32-master AMP does not.
"""

from __future__ import annotations

import contextlib
import os

import torch

from honellm.core import support, varlen
from honellm.core.support import packing_problem
from honellm.errors import HoneError
from honellm.training.checkpoint import is_fsdp


def setup_accelerator():
    """An `accelerate.Accelerator` for this process: CUDA where present, else CPU (gloo between processes).

    FSDP1 is refused here, before any run folder exists, for every recipe: Hone trains under FSDP2 only.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = not torch.cuda.is_available()
    # Frozen parameters never get gradients; DDP must not wait for them, and must not search the graph for
    # unused trainable ones (every trainable parameter is used in every step).
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    accelerator = Accelerator(cpu=cpu, mixed_precision="no", kwargs_handlers=[ddp])
    if is_fsdp(accelerator) and not accelerator.is_fsdp2:
        raise HoneError("Hone trains under FSDP2 only (per-parameter sharding keeps frozen bf16 and trainable fp32 "
                        "weights apart)", where="accelerate config", fix="set fsdp_version: 2 in your accelerate config")
    if cpu and accelerator.num_processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        # N processes on one CPU: share the cores instead of each one using all of them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    return accelerator


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with the same seed on every process.

    The same seed everywhere makes adapter initialisation identical on every process (DDP also broadcasts
    rank 0's weights); data order is seeded separately by the batch sampler.
    """
    from accelerate.utils import set_seed

    set_seed(seed)


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a distributed launch (torchrun / accelerate set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


EAGER_MAX_LENGTH = 256  # on CPU, eager attention trains faster than sdpa's flash kernel up to about this length


def pick_attention(model, choice: str, *, device: torch.device, longest: int, packed: bool = False,
                   compute_dtype: torch.dtype | None = None) -> str:
    """Set the model's attention kernel for training and return its name.

    `auto`: on CPU, eager attention for sequences up to `EAGER_MAX_LENGTH` tokens (PyTorch's CPU flash-attention
    backward costs about 2.5x eager's on SmolLM2 at 80 tokens, measured) and sdpa beyond (eager materialises
    sequence x sequence scores); on GPUs, sdpa (flash / memory-efficient kernels), or for packed batches
    (`packed`) a varlen kernel, which keeps each sequence apart without computing across it (sdpa would need a
    block-diagonal mask and compute the whole row): flash-attention 2 where the `flash_attn` package is installed,
    else PyTorch's own (`honellm.core.varlen`, torch 2.10+) where `varlen.usable` says so.
    """
    if choice == "auto" and packed and device.type == "cuda":
        if has_flash_attn():
            choice = "flash_attention_2"
        elif varlen.usable(model, device, compute_dtype) is None:
            varlen.install(model)
            return varlen.NAME
    if choice == "auto":
        choice = "eager" if device.type == "cpu" and longest <= EAGER_MAX_LENGTH else "sdpa"
    current = getattr(model.config, "_attn_implementation", None)
    if current != choice and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(choice)
    return getattr(model.config, "_attn_implementation", choice)


def decide_packing(asked: bool | None, attention: str, model, device: torch.device,
                   compute_dtype: torch.dtype) -> tuple[bool, str | None]:
    """Whether a run packs its micro-batches (`asked`: the recipe's `packing` setting), and for the run log, on a
    CUDA GPU where packing stays off by default, why (else None).

    As asked (an error where the model cannot keep packed sequences apart), or by default on CUDA GPUs with a
    varlen attention kernel for the model (flash-attention 2 where `flash_attn` is installed, else PyTorch's own,
    `honellm.core.varlen`) and `attention=auto`. Without one, attention over a packed row is masked to each
    sequence but still computed over the whole row (sdpa with a block-diagonal mask: a row of k sequences costs
    about k times their attention), while length-grouped padded micro-batches carry only a few percent of padding;
    on a CPU packing measured no faster (bench/README.md)."""
    problem = packing_problem(model)
    if asked is not None:
        if asked and problem is not None:
            raise HoneError(f"packing=true cannot keep sequences apart for this model: {problem}", where="packing",
                            fix="drop packing=true (micro-batches are then padded)")
        return bool(asked), None
    if device.type != "cuda":
        return False, None
    if attention != "auto":
        return False, f"attention={attention} was asked for (packing needs a varlen kernel, which auto picks)"
    if problem is not None:
        return False, problem
    if has_flash_attn():
        return True, None
    why_not = varlen.usable(model, device, compute_dtype)
    return why_not is None, why_not


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpointing): transformers'
    `activation_checkpointing_enable`, or its older name `gradient_checkpointing_enable` (deprecated in 5.x, to be
    removed in 6) on a transformers without it."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def compile_layers(model, *, mode: str | None = None, dynamic: bool = True) -> int:
    """torch.compile every decoder layer in place (regional compilation: the layers share one compiled graph, with
    dynamic shapes so that changing batch lengths do not recompile); return how many were compiled. `mode` and
    `dynamic` go to torch.compile (`mode="reduce-overhead", dynamic=False`: CUDA graphs of static-shape layers).

    On CPU the gain comes from fusing the elementwise work around the matmuls (RMSNorm, rotary, SiLU, adapter
    scaling and addition), which is about half of a LoRA step's time on a 135M model.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = support.decoder_layers(model)
    if layers is None:
        return 0
    # Under gradient checkpointing a layer's forward runs inside checkpoint's higher-order op, where dynamo refuses
    # every side effect, and transformers 5.x (through the `kernels` package it requires) sets a context variable in
    # each attention forward: every compiled layer fell back to eager whole. The variable is set and reset within
    # the forward, so leaving it out of the backward's recomputation changes nothing (tests/unit/test_varlen.py).
    import torch._dynamo

    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers:
        layer.compile(dynamic=dynamic, **({"mode": mode} if mode else {}))
    # The first layer reads the frozen embedding's output, which needs no gradient, the others their predecessor's,
    # which does: dynamo guards on that and compiled every layer's graph twice (forward and backward, a minute or
    # more of Triton compilation on a GPU). With the embedding's output marked as needing a gradient (what
    # transformers' `enable_input_require_grads` does) every layer shares one graph; the price is the first
    # layer's input gradient, computed and dropped.
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if embeddings is not None and not any(p.requires_grad for p in embeddings.parameters()):
        embeddings.register_forward_hook(_output_requires_grad)
    return len(layers)


def _output_requires_grad(module, args, output):
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.requires_grad_()
    return None


# ------------------------------------------------------------------------------------------------ CUDA graphs
# `cuda_graphs=true` (SFT and the DPO family): every micro-batch one packed row of one static width, the decoder
# layers compiled with mode="reduce-overhead" and static shapes, so each step replays one recorded graph per layer.


def cuda_graphs_slots(model, device: torch.device, compute_dtype: torch.dtype, *, packing: bool,
                      unpacked_because: str | None, attention: str, sequences: int) -> int:
    """The sequence slots of every static packed row (`sequences`, the most a process's micro-batch holds, plus
    the filler); an error naming what to change where CUDA graphs cannot run."""
    if device.type != "cuda":
        raise HoneError(f"cuda_graphs=true needs a CUDA GPU (this run is on {device.type})", where="cuda_graphs",
                        fix="drop cuda_graphs=true (compile=true compiles the layers on any device)")
    varlen_kernel = attention in (varlen.NAME, "flash_attention_2")
    if not packing or not varlen_kernel:
        why = unpacked_because or f"attention {attention} has no varlen kernel"
        raise HoneError(f"cuda_graphs=true replays static packed rows, which need packing under a varlen attention "
                        f"kernel: {why}", where="cuda_graphs",
                        fix="drop cuda_graphs=true, or let packing and attention take their defaults")
    if attention == varlen.NAME:
        problem = varlen.usable(model, device, compute_dtype, static=True)
        if problem is not None:
            raise HoneError(f"cuda_graphs=true: {problem}", where="cuda_graphs", fix="drop cuda_graphs=true")
    return sequences + 1


def compile_for_graphs(model) -> None:
    """The decoder layers compiled for CUDA graphs of static shapes, gradients copied out of the graphs' pool."""
    if compile_layers(model, mode="reduce-overhead", dynamic=False) == 0:
        raise HoneError("cuda_graphs=true found no decoder layers to compile in this model", where="cuda_graphs",
                        fix="drop cuda_graphs=true")
    own_gradients(model)


def own_gradients(model) -> None:
    """Copy each trainable parameter's gradient out of the CUDA graphs' memory pool when autograd first sets it.

    A compiled layer's backward hands its outputs (the adapter's gradients) to autograd from the graph tree's pool,
    and autograd keeps the first one as the parameter's `.grad` itself: the next replay would overwrite it (the
    optimizer then reads a gradient of the wrong micro-batch, or PyTorch refuses the access). PyTorch clones them
    itself from mid-2026 (pytorch/pytorch#184153); the device image's 2.11 does not. The copy is once per step per
    parameter (an adapter's size); later micro-batches add into it."""
    def copy_out(param: torch.nn.Parameter) -> None:
        if param.grad is not None and not getattr(param.grad, "_hone_owned", False):
            param.grad = param.grad.clone()
            param.grad._hone_owned = True

    for param in model.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(copy_out)


def graph_replays(loss_fn):
    """`loss_fn` with each micro-batch's forward marked as a new iteration of the CUDA graph tree (the previous
    micro-batch's backward is done by then, so its recorded outputs may be overwritten)."""
    def marked(model, batch):
        torch.compiler.cudagraph_mark_step_begin()
        return loss_fn(model, batch)

    return marked


def eager_unless(static: bool):
    """Run compiled layers eagerly where `static` (CUDA graphs): validation's and generation's batches have other
    shapes than the training row's, and would each record graphs of their own."""
    return torch.compiler.set_stance("force_eager") if static else contextlib.nullcontext()
