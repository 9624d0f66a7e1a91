"""Q4_K, Q5_K and Q6_K quantisers for GGUF files: llama.cpp's reference k-quant algorithms in numpy.

Why our own: the `gguf` package (llama.cpp's Python library) reads the k-quants but cannot write them (its
`Q4_K.quantize_blocks` and friends raise NotImplementedError); llama.cpp writes them only in C
(`ggml/src/ggml-quants.c`). This module transcribes `quantize_row_q4_K_ref`, `quantize_row_q5_K_ref` and
`quantize_row_q6_K_ref` (what `llama-quantize` runs when no importance matrix is given) with their helpers
`make_qkx2_quants`, `make_qx_quants` and `nearest_int`, vectorised over blocks: every loop of the C code over
blocks is a numpy operation over all blocks at once, and only its loops over the 16 or 32 values of one sub-block
and over the search steps remain Python loops.

Exactness: all arithmetic is float32 as in the C code, the sums run in the C code's order (element 0, then 1...:
numpy's own `sum` adds pairwise and would round differently), `nearest_int` is the same magic-number rounding, and
fp16 conversions round to nearest even as ggml's do. `tests/unit/test_gguf_quants.py` checks the bytes against a
per-element Python transcription of the C functions and against ggml's compiled `ggml_quantize_chunk`. A llama.cpp build that lets the C compiler fuse
multiply-adds (`-march=native` with FMA) may round differently in the last bit and, rarely, pick another level.

`quantize(data, qtype)` writes the k-quants here and hands every other type to `gguf.quants.quantize`; the block
layouts are the ones `gguf.quants.Q4_K.dequantize_blocks` etc. read.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # values per k-quant super-block
K_QUANT_TYPES = ("Q4_K", "Q5_K", "Q6_K")
_CHUNK = 512  # super-blocks per vectorised step: temporaries of 512 KB stay in cache (4096 measured 2x slower)
_GROUP_MAX_EPS = np.float32(1e-15)


def quantize(data: np.ndarray, qtype) -> np.ndarray:
    """`data` (rows of floats, any shape) in GGML type `qtype` as the bytes a GGUF file stores.

    Q4_K/Q5_K/Q6_K are quantised here, any other type by `gguf.quants.quantize`. A row length that is not a
    multiple of 256 raises `gguf.QuantError`, as gguf does for its block types.
    """
    import gguf

    qtype = gguf.GGMLQuantizationType(qtype)
    if qtype.name not in K_QUANT_TYPES:
        return gguf.quants.quantize(data, qtype)
    if data.shape[-1] % QK_K:
        raise gguf.QuantError(f"Can't quantize tensor with shape {data.shape} to {qtype.name}")
    block_fn = {"Q4_K": quantize_q4_k_blocks, "Q5_K": quantize_q5_k_blocks, "Q6_K": quantize_q6_k_blocks}
    blocks = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, QK_K)
    out = np.concatenate([block_fn[qtype.name](blocks[i:i + _CHUNK]) for i in range(0, len(blocks), _CHUNK)]) \
        if len(blocks) else np.zeros((0, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8)
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK_K * out.shape[-1])


def nearest_int(f: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int`: add 1.5 * 2**23 in float32 and read the low mantissa bits (round half to even)."""
    bits = (np.asarray(f, dtype=np.float32) + np.float32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _ordered_sum(values: np.ndarray) -> np.ndarray:
    """Sum over axis 0 one element after another, as the C loops do (float32)."""
    total = values[0].copy()
    for row in values[1:]:
        total += row
    return total


def _fp16(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).astype(np.float16)


def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """`make_qkx2_quants` (use_mad false) over many groups at once: x, weights (n, groups) float32, values along
    axis 0. Returns (scale, the_min, L): the affine fit x ~ scale * L - the_min with L in 0..nmax, found by trying
    nstep + 1 grid sizes around nmax and fitting scale and min by weighted least squares for each."""
    f32 = np.float32
    x_min = np.minimum(x.min(axis=0), f32(0))  # the C loop's min, then `if (min > 0) min = 0`
    x_max = x.max(axis=0)
    sum_w = _ordered_sum(weights)
    sum_x = _ordered_sum(weights * x)
    flat = x_max == x_min  # all equal (and <= 0): L = 0, scale 0
    iscale = f32(nmax) / np.where(flat, f32(1), x_max - x_min)
    scale = f32(1) / iscale
    levels = np.clip(nearest_int(iscale * (x - x_min)), 0, nmax).astype(np.float32)
    diff = scale * levels + x_min - x
    best_error = _ordered_sum(weights * (diff * diff))
    for step in range(nstep + 1):
        # the C code divides by max - min with the best min so far, which each better fit moves
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / np.where(flat, f32(1), x_max - x_min)
        trial = np.clip(nearest_int(iscale * (x - x_min)), 0, nmax).astype(np.float32)
        wl = weights * trial
        sum_l = _ordered_sum(wl)
        sum_l2 = _ordered_sum(wl * trial)
        sum_xl = _ordered_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive_min = this_min > 0
        this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
        this_min = np.where(positive_min, f32(0), this_min)
        diff = this_scale * trial + this_min - x
        error = _ordered_sum(weights * (diff * diff))
        better = (det > 0) & (error < best_error) & ~flat
        levels = np.where(better, trial, levels)
        best_error = np.where(better, error, best_error)
        scale = np.where(better, this_scale, scale)
        x_min = np.where(better, this_min, x_min)
    levels = np.where(flat, 0, levels).astype(np.int32)
    scale = np.where(flat, f32(0), scale).astype(np.float32)
    return scale, (-x_min).astype(np.float32), levels


def make_qx_quants(x: np.ndarray, nmax: int):
    """`make_qx_quants` with rmse_type 1 and no importance weights (weights x**2) over many groups at once:
    x (n, groups) float32. Returns (scale, L) with x ~ scale * (L - nmax), L in 0..2*nmax-1, the scale chosen
    among 19 grids around nmax / max|x| by the weighted least-squares fit."""
    f32 = np.float32
    groups = np.arange(x.shape[1])
    signed_max = x[np.abs(x).argmax(axis=0), groups]  # the first value of largest magnitude, with its sign
    zero = np.abs(signed_max) < _GROUP_MAX_EPS
    signed_max = np.where(zero, f32(1), signed_max)
    weights = x * x

    def fit(iscale):
        level = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
        lf = level.astype(np.float32)
        return level, _ordered_sum(weights * x * lf), _ordered_sum(weights * lf * lf)

    level, sumlx, suml2 = fit(f32(-nmax) / signed_max)
    levels = level + nmax
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        level, sumlx, suml2 = fit(-(f32(nmax) + f32(0.1) * f32(step)) / signed_max)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = np.where(better, level + nmax, levels)
        scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, f32(1)), scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, f32(0), scale).astype(np.float32), np.where(zero, 0, levels)


def _scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 bytes holding 8 six-bit scales and 8 six-bit mins (what ggml's `get_scale_min_k4` unpacks):
    bytes 0-3 scales 0-3, bytes 4-7 mins 0-3, bytes 8-11 the low nibbles of scales and mins 4-7, whose high two
    bits sit in the top bits of bytes 0-3 (scales) and 4-7 (mins)."""
    packed = np.empty((ls.shape[0], 12), np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return packed


def _quantize_kx(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The part `quantize_row_q4_K_ref` and `quantize_row_q5_K_ref` share: 8 sub-blocks of 32 per super-block,
    each fitted by make_qkx2_quants, their scales and mins stored in 6 bits against fp16 super-scales, then the
    values re-rounded against the stored scales. Returns (d, dmin (fp16), packed scales (12 bytes), L (nb, 256))."""
    f32 = np.float32
    nb = blocks.shape[0]
    x = blocks.reshape(nb * 8, 32).T  # (32, groups): element index first, for the ordered sums
    av_x = np.sqrt(_ordered_sum(x * x) / f32(32))
    scales, mins, levels = make_qkx2_quants(x, av_x + np.abs(x), nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
    inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
    # uint8_t ls = nearest_int(...): the int is truncated to 8 bits before MIN(63, ls)
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d = _fp16(max_scale / f32(63))
    dmin = _fp16(max_min / f32(63))
    step = d.astype(np.float32)[:, None] * ls.astype(np.float32)  # (nb, 8)
    offset = dmin.astype(np.float32)[:, None] * lm.astype(np.float32)
    levels = levels.T.reshape(nb, 8, 32)
    xs = blocks.reshape(nb, 8, 32)
    safe = np.where(step != 0, step, f32(1))[..., None]
    requantized = np.clip(nearest_int((xs + offset[..., None]) / safe), 0, nmax)
    levels = np.where((step != 0)[..., None], requantized, levels)  # `if (!d) continue;` keeps the fit's L
    return d, dmin, _scale_min_k4(ls, lm), levels.reshape(nb, QK_K).astype(np.uint8)


def quantize_q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """`quantize_row_q4_K_ref`: (nb, 256) float32 -> (nb, 144) bytes: d, dmin (fp16), scales (12), qs (128)."""
    with np.errstate(all="ignore"):
        d, dmin, scales, levels = _quantize_kx(blocks, 15, -1.0, 0.1, 20)
    nb = len(blocks)
    pairs = levels.reshape(nb, 4, 2, 32)  # per 64 values: low nibbles the first 32, high nibbles the next 32
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), scales, qs], axis=1)


def quantize_q5_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """`quantize_row_q5_K_ref`: (nb, 256) float32 -> (nb, 176) bytes: d, dmin, scales (12), qh (32), qs (128)."""
    with np.errstate(all="ignore"):
        d, dmin, scales, levels = _quantize_kx(blocks, 31, -0.5, 0.1, 15)
    nb = len(blocks)
    pairs = levels.reshape(nb, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(nb, 128)
    high = (pairs >> 4).reshape(nb, 8, 32)  # the fifth bit; value k of chunk c goes to bit c of qh[k]
    qh = np.zeros((nb, 32), np.uint8)
    for bit in range(8):
        qh |= high[:, bit] << bit
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), scales, qh, qs],
                          axis=1)


def quantize_q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """`quantize_row_q6_K_ref`: (nb, 256) float32 -> (nb, 210) bytes: ql (128), qh (64), 16 int8 scales, d."""
    f32 = np.float32
    nb = len(blocks)
    with np.errstate(all="ignore"):
        x = blocks.reshape(nb * 16, 16).T
        scales, levels = make_qx_quants(x, 32)
        scales = scales.reshape(nb, 16)
        pick = np.abs(scales).argmax(axis=1)  # first of largest magnitude, as the C loop's strict `>`
        max_scale = scales[np.arange(nb), pick]
        zero = np.abs(max_scale) < _GROUP_MAX_EPS
        iscale = f32(-128) / np.where(zero, f32(1), max_scale)
        d = _fp16(f32(1) / iscale)
        q_scales = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)  # int8_t store wraps
        step = d.astype(np.float32)[:, None] * q_scales.astype(np.float32)
        levels = levels.T.reshape(nb, 16, 16)
        requantized = np.clip(nearest_int(blocks.reshape(nb, 16, 16) / np.where(step != 0, step, f32(1))[..., None]),
                              -32, 31) + 32
        levels = np.where((step != 0)[..., None], requantized, levels).reshape(nb, 2, 4, 32).astype(np.uint8)
    low, high = levels & 0xF, levels >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), q_scales.view(np.uint8),
                          d.view(np.uint8).reshape(nb, 2)], axis=1)
    out[zero] = 0  # an all-zero super-block is stored as zero bytes (the C code's memset)
    return out
