"""Native bf16 kernels, compiled on first use: products for the generation engine, and the elementwise parts of the
training forward; torch's operations wherever they are not.

A decoding step reads every weight once, and at 1-32 rows its time is the time of those reads. Neither `torch.mv`
(one row at a time) nor oneDNN's prepacked product prefetches, and both stream the weights well below this
machine's read bandwidth. Two kernels do:

- AMX (`pack`, `matmul`): the weight packed once into 1 KiB bf16 tiles; each thread streams pairs of 16-row
  blocks once, prefetched, against x's rows 32 at a time (2 x 2 tiles, fp32 sums). Over the 121 products of a
  SmolLM2-135M step (268 MB, cold): 0.39-0.48 of oneDNN's time at 1-16 rows, 0.53-0.55 at 24-32, about the same
  as oneDNN from 256 rows up; the same bits as `F.linear` at every shape checked.
- AVX512-BF16 matrix-vector product (`mv`), for CPUs without AMX: eight rows reduced at once with `vdpbf16ps`,
  prefetching: 0.61-0.65 of `torch.mv`'s time (25 GB/s against 16-19), equal to it but for rare last-bit
  roundings (fp32 sums in another order, rounded once to bf16 like `torch.mv`).

Training (`honellm.core.fastpath`) takes three fused kernels, each one pass over the activations forward and
one backward where autograd runs five to a dozen operations: LlamaRMSNorm (`rms_norm`, frozen weight; 0.15x torch's
time forward plus backward at [284, 576]), SwiGLU over the gate|up product (`swiglu`, its gradient written into one
[rows, 2 x inner] tensor: 0.51x at [284, 2 x 1536]), and the q|k|v product's split into heads, rotary embedding and
shared-prefix layout (`qkv_rotary`). They round every intermediate to bf16 where torch does, so they give torch's
bits but for rare last-bit differences in fp32 sums. A LoRA step on SmolLM2-135M: 0.895x the time with the first
two, about 0.9x again with the third (interleaved pairs; this machine's noise is of the same order).

It is plain C (no torch headers; the sources are in `csrc/`), compiled with the system's C compiler in well under a second, cached in Hone's
cache folder under a name that hashes the source, the compiler and this CPU, and called through `ctypes` with the
tensors' data pointers. It runs on OpenMP threads of the runtime torch already loaded (the library asks for
`libgomp.so.1`, which resolves to torch's copy), with torch's thread count. It is used only where everything
holds: Linux on x86-64, a CPU with AVX512-BF16 (and AMX for the tiles), torch on GNU OpenMP, a compiler that
builds it, Linux granting AMX tile state, and a self-check against fp32 products at load. Anything else,
`HONE_NATIVE=0` or `HONE_FAST=0`, keeps torch's products; `status()` says which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from honellm import hardware

CSRC = Path(__file__).with_name("csrc")  # the kernels' C sources, one library built from every .c file there
# Warnings on (the tests build the same sources with -Werror); -march=native: the CPU this process runs on.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-Wall", "-Wextra"]

COMPILE_TIMEOUT = 120  # seconds; a compiler that hangs must not hang generation
MATMUL_ROWS = 1024  # rows of x per AMX call: up to here it matched oneDNN's time or beat it (runners._matmul)


@dataclass
class Tiles:
    """A weight [out_features, in_features] packed for `matmul` (see `hone_amx_pack` in csrc/amx.c)."""

    data: torch.Tensor
    out_features: int
    in_features: int


@dataclass
class _Kernels:
    gemv: object
    amx: bool
    pack: object = None
    matmul: object = None
    rmsnorm_fwd: object = None
    rmsnorm_bwd: object = None
    swiglu_fwd: object = None
    swiglu_bwd: object = None
    qkv_rotary_fwd: object = None
    qkv_rotary_bwd: object = None


_lock = threading.Lock()
_kernels: _Kernels | None = None
_status: str | None = None  # what is used, or why not


def status() -> str:
    """Which products decoding uses, and why (builds the kernels if that has not been tried yet)."""
    _resolve()
    return _status or ""


def amx_available() -> bool:
    """Whether `pack` and `matmul` run here (a CPU with AMX, and the kernels built)."""
    kernels = _resolve()
    return kernels is not None and kernels.amx


def mv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`torch.mv(weight, x)`, through the native kernel where it applies (bf16 CPU tensors, unit inner stride)."""
    kernels = _resolve() if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" else None
    if (kernels is None or x.dtype != torch.bfloat16 or x.device.type != "cpu" or weight.dim() != 2 or x.dim() != 1
            or x.shape[0] != weight.shape[1] or weight.stride(1) != 1 or x.stride(0) != 1
            or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
        return torch.mv(weight, x)  # autograd, other dtypes and layouts
    return _gemv(kernels, weight, x)


def pack(weight: torch.Tensor) -> Tiles | None:
    """`weight` [N, K] (bf16, CPU, K a multiple of 32) packed for `matmul`; None where AMX does not apply."""
    if (weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2
            or weight.shape[1] % 32 or not amx_available()):
        return None
    return _pack(_kernels, weight)


def matmul(x: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """`x @ W.T` for the W that `tiles` packs: x [..., K] bf16 on the CPU, the result [..., N] bf16 (no autograd)."""
    return _matmul(_kernels, x, tiles)


def training_kernels() -> bool:
    """Whether the fused elementwise kernels of the training forward (`rms_norm`, `swiglu` and their gradients) run
    here."""
    return _resolve() is not None


def _rows(t: torch.Tensor) -> bool:
    """A bf16 CPU matrix whose rows are contiguous (any row stride): what the elementwise kernels read."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.dim() == 2 and t.stride(1) == 1


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as the kernels read it (a gradient autograd handed over in another layout or dtype is converted)."""
    return t if _rows(t) else t.to(torch.bfloat16).contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """LlamaRMSNorm in bf16 in one pass over x [rows, cols]: `weight * (x.float() * r).to(bf16)` with
    `r = rsqrt(mean(x.float()^2) + eps)`. Returns `(y, r)` (y [rows, cols] bf16, r [rows] fp32 for the backward),
    or None where the kernels do not apply (the caller computes it with torch). No autograd: see
    `honellm.core.fastpath.RMSNormFunction`."""
    if not (_rows(x) and weight.dtype == torch.bfloat16 and weight.is_contiguous() and weight.shape == x.shape[1:]):
        return None
    kernels = _resolve()
    return None if kernels is None else _rms_norm(kernels, x, weight, eps)


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The input gradient of `rms_norm` (x, r and weight as `rms_norm` took and gave them): `r * (g_n - n *
    mean(g_n * n))` with `n = x * r` and `g_n = grad * weight` rounded to bf16, as autograd computes it."""
    return _rms_norm_backward(_kernels, grad, x, r, weight)


def swiglu(z: torch.Tensor) -> torch.Tensor | None:
    """`silu(gate) * up` for z = [gate | up] [rows, 2 x inner] bf16 (a LLaMA MLP's two input products side by side),
    in one pass, rounded as torch rounds `F.silu(gate) * up` in bf16; None where the kernels do not apply."""
    if not _rows(z) or z.shape[1] % 2:
        return None
    kernels = _resolve()
    return None if kernels is None else _swiglu(kernels, z)


def swiglu_backward(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The gradient of `swiglu` with respect to z, both halves in one [rows, 2 x inner] tensor (no concatenation)."""
    return _swiglu_backward(_kernels, grad, z)


@dataclass(frozen=True)
class Layout:
    """How a decoder layer's rows are laid out for attention: `prefix` shared-prefix tokens (0: none), then `batch`
    sequences of `rest` tokens each; `heads` query heads, `kv_heads` key/value heads of `head_dim`."""

    prefix: int
    batch: int
    rest: int
    heads: int
    kv_heads: int
    head_dim: int


def qkv_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Rotary embedding and attention layout in one pass over a layer's q|k|v product qkv [rows, (heads + 2 x
    kv_heads) x head_dim] bf16, with cos and sin [rows, head_dim] bf16: `(q_prefix [1, heads, prefix, d], q_rest
    [batch, heads, rest, d], keys, values [batch, kv_heads, prefix + rest, d])`, the prefix's keys and values in
    every sequence; the bits of `q * cos + rotate_half(q) * sin` (and k's) sliced and concatenated that way. None
    where the kernels do not apply."""
    return _qkv_rotary(_kernels, qkv, cos, sin, layout) if qkv_rotary_applies(qkv, cos, sin, layout) else None


def qkv_rotary_applies(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout) -> bool:
    """Whether `qkv_rotary` takes these tensors (bf16 rows, the layout's sizes) and the kernels run here."""
    d = layout.head_dim
    if (not _rows(qkv) or not _rows(cos) or not _rows(sin) or d % 2 or d > 512 or cos.stride(0) != d
            or sin.stride(0) != d or qkv.shape[1] != (layout.heads + 2 * layout.kv_heads) * d
            or qkv.shape[0] != layout.prefix + layout.batch * layout.rest or cos.shape != (qkv.shape[0], d)
            or sin.shape != cos.shape):
        return False
    return _resolve() is not None


def qkv_rotary_backward(grads: tuple, cos: torch.Tensor, sin: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The gradient of `qkv_rotary` with respect to qkv from its four outputs' gradients (None for an unused one)."""
    return _qkv_rotary_backward(_kernels, grads, cos, sin, layout)


def _qkv_rotary(kernels: _Kernels, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout):
    p, b, r, h, kv, d = (layout.prefix, layout.batch, layout.rest, layout.heads, layout.kv_heads, layout.head_dim)
    q_prefix = torch.empty(1, h, p, d, dtype=torch.bfloat16)
    q_rest = torch.empty(b, h, r, d, dtype=torch.bfloat16)
    keys = torch.empty(b, kv, p + r, d, dtype=torch.bfloat16)
    values = torch.empty(b, kv, p + r, d, dtype=torch.bfloat16)
    kernels.qkv_rotary_fwd(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), q_prefix.data_ptr(),
                           q_rest.data_ptr(), keys.data_ptr(), values.data_ptr(), p, b, r, h, kv, d,
                           torch.get_num_threads())
    return q_prefix, q_rest, keys, values


def _qkv_rotary_backward(kernels: _Kernels, grads: tuple, cos: torch.Tensor, sin: torch.Tensor,
                         layout: Layout) -> torch.Tensor:
    p, b, r, h, kv, d = (layout.prefix, layout.batch, layout.rest, layout.heads, layout.kv_heads, layout.head_dim)
    shapes = ((1, h, p, d), (b, h, r, d), (b, kv, p + r, d), (b, kv, p + r, d))
    grads = [torch.zeros(shape, dtype=torch.bfloat16) if g is None else g.to(torch.bfloat16).contiguous()
             for g, shape in zip(grads, shapes, strict=True)]  # 4-d: read whole, so contiguous
    out = torch.empty(p + b * r, (h + 2 * kv) * d, dtype=torch.bfloat16)
    kernels.qkv_rotary_bwd(*(g.data_ptr() for g in grads), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), p, b, r, h,
                           kv, d, torch.get_num_threads())
    return out


def _rms_norm(kernels: _Kernels, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    y, r = torch.empty(rows, cols, dtype=torch.bfloat16), torch.empty(rows, dtype=torch.float32)
    kernels.rmsnorm_fwd(x.data_ptr(), x.stride(0), weight.data_ptr(), y.data_ptr(), r.data_ptr(), rows, cols, eps,
                        torch.get_num_threads())
    return y, r


def _rms_norm_backward(kernels: _Kernels, grad: torch.Tensor, x: torch.Tensor, r: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
    grad = _as_rows(grad)
    rows, cols = x.shape
    out = torch.empty(rows, cols, dtype=torch.bfloat16)
    kernels.rmsnorm_bwd(grad.data_ptr(), grad.stride(0), x.data_ptr(), x.stride(0), r.data_ptr(), weight.data_ptr(),
                        out.data_ptr(), rows, cols, torch.get_num_threads())
    return out


def _swiglu(kernels: _Kernels, z: torch.Tensor) -> torch.Tensor:
    rows, inner = z.shape[0], z.shape[1] // 2
    out = torch.empty(rows, inner, dtype=torch.bfloat16)
    kernels.swiglu_fwd(z.data_ptr(), z.stride(0), out.data_ptr(), rows, inner, torch.get_num_threads())
    return out


def _swiglu_backward(kernels: _Kernels, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    grad = _as_rows(grad)
    rows, inner = z.shape[0], z.shape[1] // 2
    out = torch.empty(rows, 2 * inner, dtype=torch.bfloat16)
    kernels.swiglu_bwd(grad.data_ptr(), grad.stride(0), z.data_ptr(), z.stride(0), out.data_ptr(), rows, inner,
                       torch.get_num_threads())
    return out


def _gemv(kernels: _Kernels, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(weight.shape[0], dtype=torch.bfloat16)
    kernels.gemv(weight.data_ptr(), weight.stride(0), x.data_ptr(), out.data_ptr(), weight.shape[0],
                 weight.shape[1], torch.get_num_threads())
    return out


def _pack(kernels: _Kernels, weight: torch.Tensor) -> Tiles:
    weight = weight.detach()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    rows, cols = weight.shape
    data = torch.empty(-(-rows // 16) * 16 * cols, dtype=torch.bfloat16)
    kernels.pack(weight.data_ptr(), weight.stride(0), rows, cols, data.data_ptr(), torch.get_num_threads())
    return Tiles(data, rows, cols)


def _matmul(kernels: _Kernels, x: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    rows = x.reshape(-1, tiles.in_features)
    if rows.stride(1) != 1 or rows.dtype != torch.bfloat16:
        rows = rows.to(torch.bfloat16).contiguous()
    out = torch.empty(rows.shape[0], tiles.out_features, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    for start in range(0, rows.shape[0], MATMUL_ROWS):
        part = rows[start: start + MATMUL_ROWS]
        kernels.matmul(part.data_ptr(), part.stride(0), tiles.data.data_ptr(), out[start:].data_ptr(),
                       out.stride(0), part.shape[0], tiles.out_features, tiles.in_features, threads)
    return out.view(*x.shape[:-1], tiles.out_features)


def _resolve() -> _Kernels | None:
    global _kernels, _status
    if _status is None:
        with _lock:
            if _status is None:
                try:
                    # The self-check's fp32 references must stay fp32 when the first call comes under autocast
                    # (GRPO's rollouts do): autocast would compute them in bf16.
                    with torch.autocast("cpu", enabled=False):
                        _kernels, _status = _load()
                except Exception as error:  # noqa: BLE001 - any failure means: use torch's products
                    _kernels, _status = None, f"torch.mv and oneDNN (the native kernels failed: {error})"
    return _kernels


def _reset() -> None:
    """Forget the loaded kernels (tests)."""
    global _kernels, _status
    with _lock:
        _kernels, _status = None, None


def _load() -> tuple[_Kernels | None, str]:
    fallback = "torch.mv and oneDNN"
    if os.environ.get("HONE_NATIVE", "1") == "0":
        return None, f"{fallback} (HONE_NATIVE=0)"
    if not hardware.fast_paths_enabled():
        return None, f"{fallback} (HONE_FAST=0)"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"{fallback} (the native kernels are for Linux on x86-64, not {sys.platform} {platform.machine()})"
    model, flags = hardware.cpu_model(), hardware.cpu_flags()
    missing = [f for f in ("avx512f", "avx512bw", "avx512_bf16") if f not in flags]
    if missing:
        return None, f"{fallback} (this CPU lacks {', '.join(missing)})"
    if not _torch_gomp():
        return None, f"{fallback} (torch does not run on GNU OpenMP here, and the kernels would start a second thread pool)"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None, f"{fallback} (no C compiler found: set CC, or install gcc)"
    path = _build(compiler, model, flags)
    library = ctypes.CDLL(str(path))
    if len(_gomp_paths()) > 1:
        return None, f"{fallback} (the kernels loaded a second OpenMP runtime beside torch's)"
    gemv = library.hone_bf16_gemv
    gemv.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
                     ctypes.c_int]
    gemv.restype = None
    kernels = _Kernels(gemv, amx=False)
    pointer, size, threads = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    for name, argtypes in (
            ("rmsnorm_fwd", [pointer, size, pointer, pointer, pointer, size, size, ctypes.c_float, threads]),
            ("rmsnorm_bwd", [pointer, size, pointer, size, pointer, pointer, pointer, size, size, threads]),
            ("swiglu_fwd", [pointer, size, pointer, size, size, threads]),
            ("swiglu_bwd", [pointer, size, pointer, size, pointer, size, size, threads]),
            ("qkv_rotary_fwd", [pointer, size, pointer, pointer, pointer, pointer, pointer, pointer, *[size] * 6, threads]),
            ("qkv_rotary_bwd", [pointer] * 7 + [size] * 6 + [threads])):
        function = getattr(library, f"hone_{name}")
        function.argtypes, function.restype = argtypes, None
        setattr(kernels, name, function)
    # AMX where the compiler built it for this CPU and Linux grants the tile state.
    if library.hone_has_amx() and "amx_bf16" in flags and library.hone_amx_init() == 0:
        kernels.pack, kernels.matmul = library.hone_amx_pack, library.hone_amx_matmul
        kernels.pack.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                 ctypes.c_int]
        kernels.matmul.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                                   ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_int]
        kernels.pack.restype = kernels.matmul.restype = None
        kernels.amx = True
    problem = _self_check(kernels)
    if problem:
        return None, f"{fallback} (a native kernel disagreed with torch: {problem})"
    what = "AMX matrix products and an AVX512-BF16 matrix-vector product" if kernels.amx else \
        "an AVX512-BF16 matrix-vector product (no AMX: oneDNN for several rows)"
    what += "; fused RMSNorm, SwiGLU and rotary layout for training"
    return kernels, f"native: {what} ({path.name})"


def _gomp_paths() -> set[str]:
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    return {line.split()[-1] for line in lines if "libgomp" in line.rsplit("/", 1)[-1]}


def _torch_gomp() -> bool:
    return torch.backends.openmp.is_available() and bool(_gomp_paths())


def sources() -> list[Path]:
    """The C source files the library is built from (csrc/*.c; csrc/*.h holds what they share)."""
    return sorted(CSRC.glob("*.c"))


def _build(compiler: str, model: str, flags: frozenset[str]) -> Path:
    """Compile the sources in csrc/ into Hone's cache (once per source text, compiler and CPU); return the
    library's path."""
    from honellm.defaults import hone_cache

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [f"{path.name}\n{path.read_text()}" for path in sorted(CSRC.glob("*.[ch]"))]
    key = hashlib.sha256("\n".join([*texts, " ".join(FLAGS), version, model, " ".join(sorted(flags))]).encode())
    folder = hone_cache() / "native"
    path = folder / f"hone_kernels-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built = Path(scratch) / path.name
        command = [compiler, *FLAGS, f"-I{CSRC}", *map(str, sources()), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} exited with {result.returncode}: {result.stderr.strip()[-500:]}")
        os.replace(built, path)  # atomic: a concurrent process sees no library or the whole of it
    return path


def _self_check(kernels: _Kernels) -> str | None:
    """Compare with fp32 products on shapes that take every path (full and partial blocks, a K tail, one row, a
    second tile of rows); fp32 sums in another order than torch's may differ by one bf16 rounding step."""
    generator = torch.Generator().manual_seed(0)
    for rows, cols in ((45, 100), (300, 576), (8, 32)):
        weight = torch.randn(rows, cols, generator=generator).to(torch.bfloat16)
        x = torch.randn(cols, generator=generator).to(torch.bfloat16)
        out = _gemv(kernels, weight, x)
        if not torch.allclose(out.float(), weight.float() @ x.float(), rtol=2 ** -7, atol=1e-3):
            return f"matrix-vector product {rows}x{cols}"
    problem = _check_training_kernels(kernels, generator)
    if problem:
        return problem
    if kernels.amx:
        for rows, cols, batch in ((45, 96, 1), (300, 576, 37), (16, 32, 16)):
            weight = torch.randn(rows, cols, generator=generator).to(torch.bfloat16)
            x = torch.randn(batch, cols, generator=generator).to(torch.bfloat16)
            out = _matmul(kernels, x, _pack(kernels, weight))
            if not torch.allclose(out.float(), x.float() @ weight.float().T, rtol=2 ** -7, atol=1e-3):
                return f"AMX product {batch}x{cols} @ {cols}x{rows}"
    return None


def _check_training_kernels(kernels: _Kernels, generator: torch.Generator) -> str | None:
    """The elementwise kernels against torch's bf16 computations, on shapes with and without a vector tail."""
    import torch.nn.functional as F

    for rows, cols in ((37, 100), (8, 64)):
        x = (torch.randn(rows, cols, generator=generator) * 3).to(torch.bfloat16)
        weight = torch.randn(cols, generator=generator).to(torch.bfloat16)
        grad = torch.randn(rows, cols, generator=generator).to(torch.bfloat16)
        y, r = _rms_norm(kernels, x, weight, 1e-5)
        x32 = x.float()
        r_ref = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
        if not torch.allclose(y.float(), (weight * (x32 * r_ref).to(torch.bfloat16)).float(), rtol=2 ** -7, atol=1e-3):
            return f"RMSNorm {rows}x{cols}"
        n, g_n = x32 * r_ref, (grad * weight).float()
        g_x = ((g_n - n * (g_n * n).mean(-1, keepdim=True)) * r_ref).to(torch.bfloat16)
        if not torch.allclose(_rms_norm_backward(kernels, grad, x, r, weight).float(), g_x.float(), rtol=2 ** -6, atol=1e-2):
            return f"RMSNorm's gradient {rows}x{cols}"
        z = (torch.randn(rows, 2 * cols, generator=generator) * 3).to(torch.bfloat16)
        gate, up = z.split(cols, dim=1)
        if not torch.allclose(_swiglu(kernels, z).float(), (F.silu(gate) * up).float(), rtol=2 ** -7, atol=1e-3):
            return f"SwiGLU {rows}x{cols}"
        d_up = (grad * F.silu(gate)).float()
        d_gate = torch.ops.aten.silu_backward(grad * up, gate).float()
        if not torch.allclose(_swiglu_backward(kernels, grad, z).float(), torch.cat([d_gate, d_up], dim=1), rtol=2 ** -6,
                              atol=1e-2):
            return f"SwiGLU's gradient {rows}x{cols}"
    layout = Layout(prefix=5, batch=2, rest=3, heads=4, kv_heads=2, head_dim=40)
    rows, d = 11, layout.head_dim
    qkv = torch.randn(rows, 8 * d, generator=generator).to(torch.bfloat16)
    angles = torch.randn(rows, d // 2, generator=generator).repeat(1, 2)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)

    def rotate(t):  # q * cos + rotate_half(q) * sin over [rows, heads, d]
        return t * cos[:, None] + torch.cat([-t[..., d // 2:], t[..., :d // 2]], dim=-1) * sin[:, None]

    q = rotate(qkv[:, :4 * d].view(rows, 4, d)).transpose(0, 1)
    k = rotate(qkv[:, 4 * d:6 * d].view(rows, 2, d)).transpose(0, 1)
    v = qkv[:, 6 * d:].view(rows, 2, d).transpose(0, 1)
    expected_keys = torch.stack([torch.cat([k[:, :5], k[:, 5 + 3 * i:8 + 3 * i]], dim=1) for i in range(2)])
    expected_values = torch.stack([torch.cat([v[:, :5], v[:, 5 + 3 * i:8 + 3 * i]], dim=1) for i in range(2)])
    q_prefix, q_rest, keys, values = _qkv_rotary(kernels, qkv, cos, sin, layout)
    if not (torch.equal(q_prefix[0], q[:, :5]) and torch.equal(q_rest, q[:, 5:].unflatten(1, (2, 3)).transpose(0, 1))
            and torch.equal(keys, expected_keys) and torch.equal(values, expected_values)):
        return "the rotary layout"
    return None
