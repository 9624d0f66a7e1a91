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

Training (`honellm.training.fastpath`) takes three fused kernels, each one pass over the activations forward and
one backward where autograd runs five to a dozen operations: LlamaRMSNorm (`rms_norm`, frozen weight; 0.15x torch's
time forward plus backward at [284, 576]), SwiGLU over the gate|up product (`swiglu`, its gradient written into one
[rows, 2 x inner] tensor: 0.51x at [284, 2 x 1536]), and the q|k|v product's split into heads, rotary embedding and
shared-prefix layout (`qkv_rotary`). They round every intermediate to bf16 where torch does, so they give torch's
bits but for rare last-bit differences in fp32 sums. A LoRA step on SmolLM2-135M: 0.895x the time with the first
two, about 0.9x again with the third (interleaved pairs; this machine's noise is of the same order).

It is plain C (no torch headers), compiled with the system's C compiler in well under a second, cached in Hone's
cache folder under a name that hashes the source, the compiler and this CPU, and called through `ctypes` with the
tensors' data pointers. It runs on OpenMP threads of the runtime torch already loaded (the library asks for
`libgomp.so.1`, which resolves to torch's copy), with torch's thread count. It is used only where everything
holds: Linux on x86-64, a CPU with AVX512-BF16 (and AMX for the tiles), torch on GNU OpenMP, a compiler that
builds it, Linux granting AMX tile state, and a self-check against fp32 products at load. Anything else, or
`HONE_NATIVE=0`, keeps torch's products; `status()` says which and why.
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

/* ---- Elementwise training kernels (bf16 in and out, fp32 arithmetic, each result rounded as torch rounds it) ---- */

static inline __m512 load16(const uint16_t *p) {  /* 16 bf16 -> fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m512 load16_tail(const uint16_t *p, long left) {
    __m256i v = _mm256_maskz_loadu_epi16((__mmask16)((1u << left) - 1u), (const void *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static inline __m256i bf16x16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }  /* round to nearest even */

static inline __m512 round16(__m512 v) {  /* fp32 -> bf16 -> fp32: what a bf16 intermediate result holds */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16x16(v)), 16));
}

static inline void store16(uint16_t *p, __m512 v) { _mm256_storeu_si256((__m256i *)p, bf16x16(v)); }

static inline void store16_tail(uint16_t *p, __m512 v, long left) {
    _mm256_mask_storeu_epi16((void *)p, (__mmask16)((1u << left) - 1u), bf16x16(v));
}

/* exp(x) in fp32: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, p the degree-7 Taylor polynomial (relative error
   below 1e-8, under fp32's own rounding). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 sigmoid16(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

/* RMSNorm forward over rows of x [rows, cols] (row stride ldx): r = 1 / sqrt(mean(x^2) + eps) (saved, fp32), and
   y = bf16(w * bf16(x * r)), as LlamaRMSNorm computes it in bf16. */
void hone_rmsnorm_fwd(const uint16_t *x, long ldx, const uint16_t *w, uint16_t *y, float *r, long rows, long cols,
                      float eps, int threads) {
    long body = cols - cols % 16;
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols >= 16384)
    for (long i = 0; i < rows; i++) {
        const uint16_t *xi = x + i * ldx;
        uint16_t *yi = y + i * cols;
        __m512 acc = _mm512_setzero_ps();
        for (long k = 0; k < body; k += 16) { __m512 v = load16(xi + k); acc = _mm512_fmadd_ps(v, v, acc); }
        if (body < cols) { __m512 v = load16_tail(xi + body, cols - body); acc = _mm512_fmadd_ps(v, v, acc); }
        float ri = 1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(_mm512_reduce_add_ps(acc) / (float)cols + eps)));
        r[i] = ri;
        __m512 rv = _mm512_set1_ps(ri);
        for (long k = 0; k < body; k += 16)
            store16(yi + k, _mm512_mul_ps(load16(w + k), round16(_mm512_mul_ps(load16(xi + k), rv))));
        if (body < cols) {
            long left = cols - body;
            store16_tail(yi + body, _mm512_mul_ps(load16_tail(w + body, left),
                                                  round16(_mm512_mul_ps(load16_tail(xi + body, left), rv))), left);
        }
    }
}

/* Its input gradient: n = x r, g_n = bf16(g * w), g_x = bf16(r (g_n - n mean(g_n n))). */
void hone_rmsnorm_bwd(const uint16_t *g, long ldg, const uint16_t *x, long ldx, const float *r, const uint16_t *w,
                      uint16_t *gx, long rows, long cols, int threads) {
    long body = cols - cols % 16, left = cols - body;
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols >= 16384)
    for (long i = 0; i < rows; i++) {
        const uint16_t *gi = g + i * ldg, *xi = x + i * ldx;
        uint16_t *oi = gx + i * cols;
        __m512 rv = _mm512_set1_ps(r[i]), acc = _mm512_setzero_ps();
        for (long k = 0; k < body; k += 16) {
            __m512 gn = round16(_mm512_mul_ps(load16(gi + k), load16(w + k)));
            acc = _mm512_fmadd_ps(gn, _mm512_mul_ps(load16(xi + k), rv), acc);
        }
        if (left) {
            __m512 gn = round16(_mm512_mul_ps(load16_tail(gi + body, left), load16_tail(w + body, left)));
            acc = _mm512_fmadd_ps(gn, _mm512_mul_ps(load16_tail(xi + body, left), rv), acc);
        }
        __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc) / (float)cols);
        for (long k = 0; k < body; k += 16) {
            __m512 gn = round16(_mm512_mul_ps(load16(gi + k), load16(w + k)));
            __m512 n = _mm512_mul_ps(load16(xi + k), rv);
            store16(oi + k, _mm512_mul_ps(_mm512_fnmadd_ps(n, dot, gn), rv));
        }
        if (left) {
            __m512 gn = round16(_mm512_mul_ps(load16_tail(gi + body, left), load16_tail(w + body, left)));
            __m512 n = _mm512_mul_ps(load16_tail(xi + body, left), rv);
            store16_tail(oi + body, _mm512_mul_ps(_mm512_fnmadd_ps(n, dot, gn), rv), left);
        }
    }
}

/* SwiGLU over rows of a [rows, 2 * inner] gate|up product (row stride ldz): h = bf16(bf16(silu(gate)) * up). */
void hone_swiglu_fwd(const uint16_t *z, long ldz, uint16_t *h, long rows, long inner, int threads) {
    long body = inner - inner % 16, left = inner - body;
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * inner >= 16384)
    for (long i = 0; i < rows; i++) {
        const uint16_t *gate = z + i * ldz, *up = gate + inner;
        uint16_t *hi = h + i * inner;
        for (long k = 0; k < body; k += 16) {
            __m512 a = load16(gate + k);
            store16(hi + k, _mm512_mul_ps(round16(_mm512_mul_ps(a, sigmoid16(a))), load16(up + k)));
        }
        if (left) {
            __m512 a = load16_tail(gate + body, left);
            store16_tail(hi + body, _mm512_mul_ps(round16(_mm512_mul_ps(a, sigmoid16(a))),
                                                  load16_tail(up + body, left)), left);
        }
    }
}

/* Its gradient, both halves of one [rows, 2 * inner] buffer: d_up = bf16(g * bf16(silu(gate))), and
   d_gate = bf16(bf16(g * up) * s (1 + gate (1 - s))), s = sigmoid(gate) (torch's silu_backward). */
static inline void swiglu_bwd16(__m512 g, __m512 a, __m512 u, __m512 *d_gate, __m512 *d_up) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 s = sigmoid16(a);
    *d_up = _mm512_mul_ps(g, round16(_mm512_mul_ps(a, s)));
    __m512 gs = _mm512_mul_ps(round16(_mm512_mul_ps(g, u)), s);
    *d_gate = _mm512_mul_ps(gs, _mm512_fmadd_ps(a, _mm512_sub_ps(one, s), one));
}

void hone_swiglu_bwd(const uint16_t *g, long ldg, const uint16_t *z, long ldz, uint16_t *dz, long rows, long inner,
                     int threads) {
    long body = inner - inner % 16, left = inner - body;
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * inner >= 16384)
    for (long i = 0; i < rows; i++) {
        const uint16_t *gi = g + i * ldg, *gate = z + i * ldz, *up = gate + inner;
        uint16_t *dgate = dz + i * 2 * inner, *dup = dgate + inner;
        __m512 dg, du;
        for (long k = 0; k < body; k += 16) {
            swiglu_bwd16(load16(gi + k), load16(gate + k), load16(up + k), &dg, &du);
            store16(dgate + k, dg);
            store16(dup + k, du);
        }
        if (left) {
            swiglu_bwd16(load16_tail(gi + body, left), load16_tail(gate + body, left), load16_tail(up + body, left),
                         &dg, &du);
            store16_tail(dgate + body, dg, left);
            store16_tail(dup + body, du, left);
        }
    }
}

/* Rotary embedding and the attention layout for one decoder layer, from its q|k|v product qkv [rows, (H + 2 KV) D]
   (row stride ldq; H query heads, KV key/value heads, D = 2 * half). Rows are P shared-prefix tokens, then B
   sequences of R tokens each (P = 0: a plain batch). Writes q_prefix [H, P, D], q_rest [B, H, R, D], and keys,
   values [B, KV, P + R, D], the prefix's keys and values copied into every sequence. A rotated element is
   bf16(bf16(x cos) + bf16(rotate_half(x) sin)), torch's rounding; cos and sin [rows, D] bf16. */
static inline void rotate_row(const uint16_t *x, const uint16_t *c, const uint16_t *s, uint16_t *out, long half) {
    for (long k = 0; k < half; k += 16) {
        long left = half - k < 16 ? half - k : 16;
        __m512 x1 = load16_tail(x + k, left), x2 = load16_tail(x + half + k, left);
        __m512 c1 = load16_tail(c + k, left), c2 = load16_tail(c + half + k, left);
        __m512 s1 = load16_tail(s + k, left), s2 = load16_tail(s + half + k, left);
        __m512 neg = _mm512_sub_ps(_mm512_setzero_ps(), x2);
        store16_tail(out + k, _mm512_add_ps(round16(_mm512_mul_ps(x1, c1)), round16(_mm512_mul_ps(neg, s1))), left);
        store16_tail(out + half + k, _mm512_add_ps(round16(_mm512_mul_ps(x2, c2)), round16(_mm512_mul_ps(x1, s2))), left);
    }
}

void hone_qkv_rotary_fwd(const uint16_t *qkv, long ldq, const uint16_t *cos, const uint16_t *sin, uint16_t *q_prefix,
                         uint16_t *q_rest, uint16_t *keys, uint16_t *values, long P, long B, long R, long H, long KV,
                         long D, int threads) {
    long rows = P + B * R, half = D / 2, S = P + R;
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * (H + 2 * KV) * D >= 16384)
    for (long t = 0; t < rows; t++) {
        const uint16_t *x = qkv + t * ldq, *c = cos + t * D, *s = sin + t * D;
        long b = t < P ? -1 : (t - P) / R, i = t < P ? t : (t - P) % R;
        for (long h = 0; h < H; h++) {
            uint16_t *out = b < 0 ? q_prefix + (h * P + i) * D : q_rest + ((b * H + h) * R + i) * D;
            rotate_row(x + h * D, c, s, out, half);
        }
        for (long h = 0; h < KV; h++) {
            const uint16_t *kx = x + (H + h) * D, *vx = x + (H + KV + h) * D;
            long first = b < 0 ? 0 : b, last = b < 0 ? B : b + 1, pos = b < 0 ? i : P + i;
            uint16_t *k0 = keys + ((first * KV + h) * S + pos) * D;
            rotate_row(kx, c, s, k0, half);
            for (long bb = first; bb < last; bb++) {
                uint16_t *k = keys + ((bb * KV + h) * S + pos) * D, *v = values + ((bb * KV + h) * S + pos) * D;
                if (bb != first) memcpy(k, k0, D * 2);
                memcpy(v, vx, D * 2);
            }
        }
    }
}

/* Its gradient: d_qkv [rows, (H + 2 KV) D] from the gradients of q_prefix, q_rest, keys and values (a prefix key's
   or value's over every sequence summed in fp32 and rounded once, as autograd sums an expanded tensor's). The
   rotation's transpose: d_x = bf16(bf16(g cos) + bf16(rotate_half^T(g sin))), rotate_half^T(y) = [y2, -y1]. */
static inline void unrotate_row(const float *g, const uint16_t *c, const uint16_t *s, uint16_t *out, long half) {
    for (long k = 0; k < half; k += 16) {
        long left = half - k < 16 ? half - k : 16;
        __mmask16 m = (__mmask16)((1u << left) - 1u);
        __m512 g1 = round16(_mm512_maskz_loadu_ps(m, g + k)), g2 = round16(_mm512_maskz_loadu_ps(m, g + half + k));
        __m512 c1 = load16_tail(c + k, left), c2 = load16_tail(c + half + k, left);
        __m512 s1 = load16_tail(s + k, left), s2 = load16_tail(s + half + k, left);
        __m512 gs1 = round16(_mm512_mul_ps(g1, s1)), gs2 = round16(_mm512_mul_ps(g2, s2));
        store16_tail(out + k, _mm512_add_ps(round16(_mm512_mul_ps(g1, c1)), gs2), left);
        store16_tail(out + half + k, _mm512_sub_ps(round16(_mm512_mul_ps(g2, c2)), gs1), left);
    }
}

static inline void sum_rows(const uint16_t *first, long stride, long count, float *acc, long D) {
    for (long k = 0; k < D; k++) acc[k] = 0.0f;
    for (long n = 0; n < count; n++)
        for (long k = 0; k < D; k += 16) {
            long left = D - k < 16 ? D - k : 16;
            __mmask16 m = (__mmask16)((1u << left) - 1u);
            _mm512_mask_storeu_ps(acc + k, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + k),
                                                            load16_tail(first + n * stride + k, left)));
        }
}

void hone_qkv_rotary_bwd(const uint16_t *g_prefix, const uint16_t *g_rest, const uint16_t *g_keys,
                         const uint16_t *g_values, const uint16_t *cos, const uint16_t *sin, uint16_t *d_qkv, long P,
                         long B, long R, long H, long KV, long D, int threads) {
    long rows = P + B * R, half = D / 2, S = P + R, width = (H + 2 * KV) * D;
    #pragma omp parallel for schedule(static) num_threads(threads) if (rows * width >= 16384)
    for (long t = 0; t < rows; t++) {
        float acc[512];
        const uint16_t *c = cos + t * D, *s = sin + t * D;
        uint16_t *out = d_qkv + t * width;
        long b = t < P ? -1 : (t - P) / R, i = t < P ? t : (t - P) % R;
        for (long h = 0; h < H; h++) {
            const uint16_t *g = b < 0 ? g_prefix + (h * P + i) * D : g_rest + ((b * H + h) * R + i) * D;
            sum_rows(g, 0, 1, acc, D);
            unrotate_row(acc, c, s, out + h * D, half);
        }
        long first = b < 0 ? 0 : b, count = b < 0 ? B : 1, pos = b < 0 ? i : P + i, stride = KV * S * D;
        for (long h = 0; h < KV; h++) {
            sum_rows(g_keys + ((first * KV + h) * S + pos) * D, stride, count, acc, D);
            unrotate_row(acc, c, s, out + (H + h) * D, half);
            sum_rows(g_values + ((first * KV + h) * S + pos) * D, stride, count, acc, D);
            for (long k = 0; k < D; k += 16) {
                long left = D - k < 16 ? D - k : 16;
                store16_tail(out + (H + KV + h) * D + k, _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1u), acc + k), left);
            }
        }
    }
}

#ifdef __AMX_BF16__
#include <sys/syscall.h>
#include <unistd.h>

int hone_has_amx(void) { return 1; }

/* Linux hands out AMX tile state only to a process that asks for it (once; oneDNN asks too). 0 on success. */
int hone_amx_init(void) { return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */); }

/* Tiles of W [N, K] (row stride ldw) for the AMX product: for each block of 16 rows, for each chunk of 32 columns,
   one 1 KiB tile of 16 x 16 bf16 pairs, tile[r][n] = (W[n][2r], W[n][2r + 1]) (the B operand's layout); zeros
   beyond N and K. out holds ceil(N / 16) * 16 * ceil(K / 32) * 32 bf16. */
void hone_amx_pack(const uint16_t *W, long ldw, long N, long K, uint16_t *out, int threads) {
    long blocks = (N + 15) / 16, chunks = (K + 31) / 32;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < blocks; b++) {
        for (long c = 0; c < chunks; c++) {
            uint16_t *tile = out + (b * chunks + c) * 512;
            if (b * 16 + 16 <= N && c * 32 + 32 <= K) {  /* a whole tile: a 16 x 16 transpose of bf16 pairs */
                uint32_t pairs[16][16], *dst = (uint32_t *)tile;
                for (long n = 0; n < 16; n++) memcpy(pairs[n], W + (b * 16 + n) * ldw + c * 32, 64);
                for (long r = 0; r < 16; r++)
                    for (long n = 0; n < 16; n++) dst[r * 16 + n] = pairs[n][r];
                continue;
            }
            for (long n = 0; n < 16; n++) {
                long row = b * 16 + n;
                for (long k = 0; k < 32; k++) {
                    long col = c * 32 + k;
                    tile[((k >> 1) * 16 + n) * 2 + (k & 1)] = (row < N && col < K) ? W[row * ldw + col] : 0;
                }
            }
        }
    }
}

typedef struct { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;

/* Tiles 0, 1: rows [m0, m0 + 16) and [m0 + 16, m0 + 32) of x; 2, 3: two blocks of 16 weight rows; 4..7: their
   four products (fp32). `low` = rows of tile 0 (<= 16), `high` = rows of tile 1 (0: unused). */
static void configure(long low, long high) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
    uint8_t h = (uint8_t)(high ? high : 1);
    cfg.rows[0] = cfg.rows[4] = cfg.rows[5] = (uint8_t)low;
    cfg.rows[1] = cfg.rows[6] = cfg.rows[7] = h;
    _tile_loadconfig(&cfg);
}

static void emit(float (*acc)[16], long rows, uint16_t *y, long ldy, long n0, long N) {
    long cols = N - n0 < 16 ? N - n0 : 16;
    for (long m = 0; m < rows; m++)
        for (long n = 0; n < cols; n++) y[m * ldy + n0 + n] = to_bf16(acc[m][n]);
}

#define TILE_AHEAD 8192  /* bytes of weight tiles prefetched ahead of use */

/* y[m, n] = sum_k x[m, k] W[n, k] with W's tiles from hone_amx_pack: x [M, K] bf16 with row stride ldx and
   K % 32 == 0, y [M, N] bf16 with row stride ldy; fp32 sums (AMX), rounded once. Each thread takes pairs of
   16-row weight blocks and runs all of x's rows (32 at a time) against them: the weights stream from memory
   once, prefetched ahead, and x stays in cache. */
void hone_amx_matmul(const uint16_t *x, long ldx, const uint16_t *tiles, uint16_t *y, long ldy, long M, long N,
                     long K, int threads) {
    long blocks = (N + 15) / 16, chunks = K / 32, pairs = (blocks + 1) / 2;
    #pragma omp parallel num_threads(threads)
    {
        float acc[16][16];
        long shape_low = -1, shape_high = -1;
        #pragma omp for schedule(static)
        for (long p = 0; p < pairs; p++) {
            long b0 = 2 * p;
            int two = b0 + 1 < blocks;
            const uint16_t *w0 = tiles + b0 * chunks * 512, *w1 = two ? w0 + chunks * 512 : w0;
            for (long m0 = 0; m0 < M; m0 += 32) {
                long low = M - m0 < 16 ? M - m0 : 16;
                long high = M - m0 <= 16 ? 0 : (M - m0 - 16 < 16 ? M - m0 - 16 : 16);
                if (low != shape_low || high != shape_high) {
                    configure(low, high);
                    shape_low = low, shape_high = high;
                }
                _tile_zero(4); _tile_zero(5);
                if (high) { _tile_zero(6); _tile_zero(7); }
                const uint16_t *xl = x + m0 * ldx, *xh = xl + 16 * ldx;
                for (long c = 0; c < chunks; c++) {
                    if (m0 == 0) {  /* the first pass over these weights reads them from memory */
                        const char *ahead = (const char *)(w0 + c * 512) + TILE_AHEAD;
                        for (int line = 0; line < 1024; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
                        if (two) {
                            ahead = (const char *)(w1 + c * 512) + TILE_AHEAD;
                            for (int line = 0; line < 1024; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
                        }
                    }
                    _tile_loadd(0, xl + c * 32, ldx * 2);
                    _tile_loadd(2, w0 + c * 512, 64);
                    _tile_dpbf16ps(4, 0, 2);
                    if (two) { _tile_loadd(3, w1 + c * 512, 64); _tile_dpbf16ps(5, 0, 3); }
                    if (high) {
                        _tile_loadd(1, xh + c * 32, ldx * 2);
                        _tile_dpbf16ps(6, 1, 2);
                        if (two) _tile_dpbf16ps(7, 1, 3);
                    }
                }
                _tile_stored(4, acc, 64);
                emit(acc, low, y + m0 * ldy, ldy, b0 * 16, N);
                if (two) { _tile_stored(5, acc, 64); emit(acc, low, y + m0 * ldy, ldy, b0 * 16 + 16, N); }
                if (high) {
                    _tile_stored(6, acc, 64);
                    emit(acc, high, y + (m0 + 16) * ldy, ldy, b0 * 16, N);
                    if (two) { _tile_stored(7, acc, 64); emit(acc, high, y + (m0 + 16) * ldy, ldy, b0 * 16 + 16, N); }
                }
            }
        }
        _tile_release();
    }
}
#else
int hone_has_amx(void) { return 0; }
#endif
"""

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
COMPILE_TIMEOUT = 120  # seconds; a compiler that hangs must not hang generation
MATMUL_ROWS = 1024  # rows of x per AMX call: up to here it matched oneDNN's time or beat it (runners._matmul)


@dataclass
class Tiles:
    """A weight [out_features, in_features] packed for `matmul` (see `hone_amx_pack` in SOURCE)."""

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
    `honellm.training.fastpath.RMSNormFunction`."""
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


def _build(compiler: str, model: str, flags: frozenset[str]) -> Path:
    """Compile SOURCE into Hone's cache (once per source, compiler and CPU); return the library's path."""
    from honellm.defaults import hone_cache

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\n".join([SOURCE, " ".join(FLAGS), version, model, " ".join(sorted(flags))]).encode())
    folder = hone_cache() / "native"
    path = folder / f"hone_kernels-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        source = Path(scratch) / "hone_kernels.c"
        source.write_text(SOURCE)
        built = Path(scratch) / path.name
        result = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True,
                                timeout=COMPILE_TIMEOUT)
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
