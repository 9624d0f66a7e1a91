#include "hone_kernels.h"

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
