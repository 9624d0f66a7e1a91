"""A native bf16 matrix-vector product for batch-1 decoding, compiled on first use; `torch.mv` wherever it is not.

At batch 1 a decoding step reads every weight once, and its time is the time of those reads. `torch.mv` on bf16
streams them at about three quarters of this machine's read bandwidth (it reduces one row at a time, and nothing
fetches ahead). The kernel below reduces eight rows at once with AVX512-BF16 dot products (`vdpbf16ps`: pairs of
bf16 products accumulated in fp32) and prefetches the rows it will read next. Measured on the 2-core AMX VM, over
the 121 products of a SmolLM2-135M step (268 MB of weights): 0.63-0.65 of `torch.mv`'s time (medians of paired
runs; 25 GB/s against 16-19), outputs equal to `torch.mv`'s except for rare last-bit roundings (fp32 sums in
another order, rounded once to bf16 like `torch.mv`).

It is plain C (no torch headers), compiled with the system's C compiler in well under a second, cached in Hone's
cache folder under a name that hashes the source, the compiler and this CPU, and called through `ctypes` with the
tensors' data pointers. It runs its rows on OpenMP threads of the runtime torch already loaded (the library asks
for `libgomp.so.1`, which resolves to torch's copy), with torch's thread count. It is used only where everything
holds: Linux on x86-64, a CPU with AVX512-BF16, torch on GNU OpenMP, a compiler that builds it, and a self-check
against `torch.mv` at load. Anything else, or `HONE_NATIVE=0`, keeps `torch.mv`; `status()` says which and why.
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
from pathlib import Path

import torch

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define ROWS 8    /* weight rows reduced together: eight independent accumulators */
#define AHEAD 16  /* rows prefetched ahead of use */

static inline uint16_t to_bf16(float f) {  /* round to nearest even, as torch's float -> bfloat16 */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m512bh tail32(const uint16_t *p, long left) {  /* the last (left < 32) elements, zeros after */
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1u << left) - 1u), (const void *)p);
}

/* y[n] = sum_k W[n, k] x[k] for n < N: W bf16 with row stride ldw, x and y bf16, fp32 sums rounded once. */
void hone_bf16_gemv(const uint16_t *W, long ldw, const uint16_t *x, uint16_t *y, long N, long K, int threads) {
    long blocks = (N + ROWS - 1) / ROWS, body = K - K % 32;
    #pragma omp parallel for schedule(static) num_threads(threads) if (N * K >= 32768)
    for (long b = 0; b < blocks; b++) {
        long n0 = b * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        const uint16_t *w = W + n0 * ldw;
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        if (rows == ROWS) {
            int ahead = n0 + AHEAD + ROWS <= N;
            for (long k = 0; k < body; k += 32) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + k));
                for (int r = 0; r < ROWS; r++) {
                    if (ahead) _mm_prefetch((const char *)(w + (r + AHEAD) * ldw + k), _MM_HINT_T0);
                    acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512((const void *)(w + r * ldw + k)), xv);
                }
            }
            if (body < K) {
                __m512bh xv = tail32(x + body, K - body);
                for (int r = 0; r < ROWS; r++)
                    acc[r] = _mm512_dpbf16_ps(acc[r], tail32(w + r * ldw + body, K - body), xv);
            }
        } else {
            for (long r = 0; r < rows; r++) {
                for (long k = 0; k < body; k += 32)
                    acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512((const void *)(w + r * ldw + k)),
                                              (__m512bh)_mm512_loadu_si512((const void *)(x + k)));
                if (body < K)
                    acc[r] = _mm512_dpbf16_ps(acc[r], tail32(w + r * ldw + body, K - body), tail32(x + body, K - body));
            }
        }
        for (long r = 0; r < rows; r++) y[n0 + r] = to_bf16(_mm512_reduce_add_ps(acc[r]));
    }
}
"""

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
COMPILE_TIMEOUT = 120  # seconds; a compiler that hangs must not hang generation

_lock = threading.Lock()
_kernel = None  # the loaded function once built; see `_resolve`
_status: str | None = None  # "native ..." or why not


def status() -> str:
    """Which matrix-vector product batch-1 decoding uses, and why (builds the kernel if it has not been tried)."""
    _resolve()
    return _status or ""


def mv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`torch.mv(weight, x)`, through the native kernel where it applies (bf16 CPU tensors, unit inner stride)."""
    kernel = _resolve() if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" else None
    if (kernel is None or x.dtype != torch.bfloat16 or x.device.type != "cpu" or weight.dim() != 2 or x.dim() != 1
            or x.shape[0] != weight.shape[1] or weight.stride(1) != 1 or x.stride(0) != 1
            or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
        return torch.mv(weight, x)  # autograd, other dtypes and layouts
    out = torch.empty(weight.shape[0], dtype=torch.bfloat16)
    kernel(weight.data_ptr(), weight.stride(0), x.data_ptr(), out.data_ptr(), weight.shape[0], weight.shape[1],
           torch.get_num_threads())
    return out


def _resolve():
    global _kernel, _status
    if _status is None:
        with _lock:
            if _status is None:
                try:
                    _kernel, _status = _load()
                except Exception as error:  # noqa: BLE001 - any failure means: use torch.mv
                    _kernel, _status = None, f"torch.mv (the native kernel failed: {error})"
    return _kernel


def _reset() -> None:
    """Forget the loaded kernel (tests)."""
    global _kernel, _status
    with _lock:
        _kernel, _status = None, None


def _load():
    """(kernel or None, status line)."""
    if os.environ.get("HONE_NATIVE", "1") == "0":
        return None, "torch.mv (HONE_NATIVE=0)"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"torch.mv (the native kernel is for Linux on x86-64, not {sys.platform} {platform.machine()})"
    flags = _cpu_flags()
    missing = [f for f in ("avx512f", "avx512bw", "avx512_bf16") if f not in flags]
    if missing:
        return None, f"torch.mv (this CPU lacks {', '.join(missing)})"
    if not _torch_gomp():
        return None, "torch.mv (torch does not run on GNU OpenMP here, and the kernel would start a second thread pool)"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None, "torch.mv (no C compiler found: set CC, or install gcc)"
    path = _build(compiler, flags)
    library = ctypes.CDLL(str(path))
    kernel = library.hone_bf16_gemv
    kernel.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                       ctypes.c_long, ctypes.c_int]
    kernel.restype = None
    if len(_gomp_paths()) > 1:
        return None, "torch.mv (the kernel loaded a second OpenMP runtime beside torch's)"
    problem = _self_check(kernel)
    if problem:
        return None, f"torch.mv (the native kernel disagreed with torch.mv: {problem})"
    return kernel, f"native AVX512-BF16 kernel ({path.name})"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _gomp_paths() -> set[str]:
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    return {line.split()[-1] for line in lines if "libgomp" in line.rsplit("/", 1)[-1]}


def _torch_gomp() -> bool:
    return torch.backends.openmp.is_available() and bool(_gomp_paths())


def _build(compiler: str, flags: set[str]) -> Path:
    """Compile SOURCE into Hone's cache (once per source, compiler and CPU); return the library's path."""
    from honellm.defaults import hone_cache

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    model = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "")
    key = hashlib.sha256("\n".join([SOURCE, " ".join(FLAGS), version, model, " ".join(sorted(flags))]).encode())
    folder = hone_cache() / "native"
    path = folder / f"hone_gemv-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        source = Path(scratch) / "hone_gemv.c"
        source.write_text(SOURCE)
        built = Path(scratch) / path.name
        result = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True,
                                timeout=COMPILE_TIMEOUT)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} exited with {result.returncode}: {result.stderr.strip()[-500:]}")
        os.replace(built, path)  # atomic: a concurrent process sees the old state or the whole library
    return path


def _self_check(kernel) -> str | None:
    """Compare with torch.mv on shapes that take every path (full blocks, a partial block, a K tail)."""
    generator = torch.Generator().manual_seed(0)
    for rows, cols in ((45, 100), (300, 576), (8, 32)):
        weight = torch.randn(rows, cols, generator=generator).to(torch.bfloat16)
        x = torch.randn(cols, generator=generator).to(torch.bfloat16)
        out = torch.empty(rows, dtype=torch.bfloat16)
        kernel(weight.data_ptr(), cols, x.data_ptr(), out.data_ptr(), rows, cols, torch.get_num_threads())
        reference = weight.float() @ x.float()
        # fp32 sums in another order than torch.mv's: allow one bf16 rounding step
        if not torch.allclose(out.float(), reference, rtol=2 ** -7, atol=1e-3):
            return f"{rows}x{cols}: largest difference {(out.float() - reference).abs().max().item():.3g}"
    return None
