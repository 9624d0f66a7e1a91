/* The AVX512-BF16 matrix-vector product (`native.mv`): eight weight rows reduced at once, prefetching. */
#include "hone_kernels.h"

#define ROWS 8    /* weight rows reduced together: eight independent accumulators */
#define AHEAD 16  /* rows prefetched ahead of use */

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
