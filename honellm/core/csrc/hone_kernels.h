/* Hone's native bf16 kernels (see honellm/core/native.py): what every source file shares. The library is built
   from every .c file in this folder in one compiler call and called through ctypes; these are its entry points. */
#ifndef HONE_KERNELS_H
#define HONE_KERNELS_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t to_bf16(float f) {  /* round to nearest even, as torch's float -> bfloat16 */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

void hone_bf16_gemv(const uint16_t *W, long ldw, const uint16_t *x, uint16_t *y, long N, long K, int threads);
void hone_rmsnorm_fwd(const uint16_t *x, long ldx, const uint16_t *w, uint16_t *y, float *r, long rows, long cols, float eps, int threads);
void hone_rmsnorm_bwd(const uint16_t *g, long ldg, const uint16_t *x, long ldx, const float *r, const uint16_t *w, uint16_t *gx, long rows, long cols, int threads);
void hone_swiglu_fwd(const uint16_t *z, long ldz, uint16_t *h, long rows, long inner, int threads);
void hone_swiglu_bwd(const uint16_t *g, long ldg, const uint16_t *z, long ldz, uint16_t *dz, long rows, long inner, int threads);
void hone_qkv_rotary_fwd(const uint16_t *qkv, long ldq, const uint16_t *cos, const uint16_t *sin, uint16_t *q_prefix, uint16_t *q_rest, uint16_t *keys, uint16_t *values, long P, long B, long R, long H, long KV, long D, int threads);
void hone_qkv_rotary_bwd(const uint16_t *g_prefix, const uint16_t *g_rest, const uint16_t *g_keys, const uint16_t *g_values, const uint16_t *cos, const uint16_t *sin, uint16_t *d_qkv, long P, long B, long R, long H, long KV, long D, int threads);
int hone_has_amx(void);
int hone_amx_init(void);
void hone_amx_pack(const uint16_t *W, long ldw, long N, long K, uint16_t *out, int threads);
void hone_amx_matmul(const uint16_t *x, long ldx, const uint16_t *tiles, uint16_t *y, long ldy, long M, long N, long K, int threads);

#endif
