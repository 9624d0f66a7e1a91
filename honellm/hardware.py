"""Hardware policy: which device and compute dtype to use.

bf16 where the hardware does it fast (CPUs with AMX or AVX512-BF16; CUDA GPUs that support bf16), fp32 otherwise.
On this class of CPU a bf16 matrix product is about 5x faster than fp32.
"""

from __future__ import annotations

import functools
import os
import resource
import sys
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    return _cpuinfo()[1]


def peak_rss_bytes() -> int:
    """Peak resident memory of this process, in bytes.

    On Linux the high-water mark of this program's own address space (`VmHWM` in /proc/self/status). Not
    `getrusage`'s `ru_maxrss`: Linux carries that over `execve`, so a program started by a large process (a
    test runner, a notebook) would report its parent's size at the fork as its own peak. Elsewhere `ru_maxrss`.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def cpu_model() -> str:
    """The CPU's "model name" line from /proc/cpuinfo (empty where it cannot be read)."""
    return _cpuinfo()[0]


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        if line.startswith("model name") and not model:
            model = line
        elif line.startswith("flags"):
            flags = frozenset(line.split(":", 1)[1].split())
            break
    return model, flags


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has AMX-BF16 or AVX512-BF16 (Sapphire Rapids and newer, Zen 4 and newer)."""
    if os.environ.get("HONE_CPU_BF16") in ("0", "1"):
        return os.environ["HONE_CPU_BF16"] == "1"
    flags = cpu_flags()
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str | None = None) -> torch.dtype:
    """Resolve "auto" under the hardware policy; pass through an explicit dtype or its name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        try:
            return DTYPES[dtype]
        except KeyError:
            from honellm.errors import HoneError

            raise HoneError(f"unknown dtype {dtype!r}", fix=f"use one of: auto, {', '.join(sorted(DTYPES))}") from None
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def describe() -> dict:
    """A short description of the hardware, for manifests and `hone advise`."""
    info = {"device": str(default_device()), "cpu_count": os.cpu_count(), "cpu_bf16": cpu_has_fast_bf16()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gb=round(props.total_memory / 2**30, 1))
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def release_freed_memory() -> bool:
    """Hand memory that was freed but kept by the C allocator back to the system (glibc's `malloc_trim`).

    After tensors are replaced in bulk (weights regrouped into one buffer), glibc keeps their freed pages in its heap,
    where they count in the process's resident memory until reused: 120 MB for SmolLM2's regrouped projections.
    A CPU training step calls it before each micro-batch larger than any before it (`honellm.training.step`): see
    there why.
    Returns whether the call was made (glibc only)."""
    # No gc.collect() first: the replaced tensors are freed by reference counting as the groups take their place,
    # and a full collection walks every object of the process (0.3 s and more per call in a long test session).
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, looked up once (`find_library` runs a program), or None where there is none."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def fast_paths_enabled() -> bool:
    """False under `HONE_FAST=0`: every fast path of `honellm.core` off (transformers' forward, torch's operations).

    Here, below the model core, so that every part of the core reads the one switch without importing another."""
    return os.environ.get("HONE_FAST", "1") != "0"
