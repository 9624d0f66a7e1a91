/* AMX tiles (`native.pack`, `native.matmul`), built where the compiler targets a CPU with AMX-BF16. */
#include "hone_kernels.h"

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
