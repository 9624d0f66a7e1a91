"""Mixed precision policy: bf16 compute, fp32 where it matters.

Where the hardware does bf16 fast (AMX / AVX512-BF16 CPUs, bf16 GPUs) frozen weights are stored in bf16, trainable
weights (and so their gradients and AdamW state) in fp32, and the forward runs under `torch.autocast(bf16)`.
Frozen weights in bf16 halve their memory and skip a cast per matmul; fp32 trainable weights keep small updates
from rounding away (a bf16 weight has 8 bits of mantissa: an update below ~0.4% of its value is lost).
Elsewhere everything is fp32 without autocast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from honellm.errors import HoneError
from honellm.hardware import pick_dtype


@dataclass(frozen=True)
class Precision:
    """How a recipe stores and computes: `compute_dtype` for frozen weights and autocast, fp32 for trainable."""

    compute_dtype: torch.dtype
    device_type: str

    @classmethod
    def resolve(cls, name: str, device: torch.device | str) -> Precision:
        """"auto" follows the hardware policy (honellm.hardware); "bf16" and "fp32" are taken as given."""
        device = torch.device(device)
        if name not in ("auto", "bf16", "fp32"):
            raise HoneError(f"unknown precision {name!r}", where="precision",
                            fix="use auto, bf16 or fp32 (fp16 training needs loss scaling, which Hone does not do)")
        dtype = pick_dtype(name, device)
        if dtype == torch.float16:  # pick_dtype never picks fp16 for "auto"; be explicit about why it is refused
            raise HoneError("fp16 training is not supported", fix="use precision=bf16 or precision=fp32")
        return cls(dtype, device.type)

    @property
    def name(self) -> str:
        return "bf16" if self.compute_dtype == torch.bfloat16 else "fp32"

    @property
    def mixed(self) -> bool:
        return self.compute_dtype != torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every forward of a recipe runs under (a no-op in fp32)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute_dtype)

    def cast_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Frozen floating-point parameters to the compute dtype, trainable ones to fp32, in place.

        Buffers are left alone (rotary frequency tables must stay fp32). Tied weights are one Parameter,
        so they are cast once.
        """
        for param in model.parameters():
            if not param.is_floating_point():
                continue
            dtype = torch.float32 if param.requires_grad else self.compute_dtype
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
        if self.mixed:
            # PEFT casts each adapter's input to the adapter's dtype (fp32 here): a copy of the activations per
            # adapted layer that autocast turns straight back into bf16 for the matmul. Under autocast the cast
            # is pure waste, and PEFT lets us switch it off (see peft.helpers.disable_input_dtype_casting).
            for module in model.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False
        return model
