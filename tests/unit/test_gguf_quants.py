"""The k-quant writers of `honellm.gguf_quants`: bit for bit what llama.cpp's C reference writes, and, read back by
the `gguf` package's own (independent) dequantiser, within the formats' error and better than a naive quantiser.

The exactness tests compare the vectorised quantisers with `_C`, a direct per-element transcription of
`ggml/src/ggml-quants.c` (`nearest_int`, `make_qkx2_quants`, `make_qx_quants`, `quantize_row_q{4,5,6}_K_ref`)
written here in scalar float32, loop for loop, on blocks chosen to reach every branch (all-zero and constant
sub-blocks, all-positive and all-negative blocks, outliers, values below GROUP_MAX_EPS); and, where the
`libggml-python` package (prebuilt ggml libraries, a dev dependency) is installed, with ggml's own compiled
`ggml_quantize_chunk`, which is what llama-quantize calls.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from honellm.gguf_quants import QK_K, quantize

try:
    import libggml
except ImportError:
    libggml = None

F = np.float32
TYPES = {"Q4_K": gguf.GGMLQuantizationType.Q4_K, "Q5_K": gguf.GGMLQuantizationType.Q5_K,
         "Q6_K": gguf.GGMLQuantizationType.Q6_K}


class _C:
    """ggml-quants.c, transcribed one scalar operation at a time (every intermediate rounded to float32)."""

    @staticmethod
    def nearest_int(fval):
        val = F(F(fval) + F(12582912.0))
        i = int(np.array([val], dtype=np.float32).view(np.int32)[0])
        return (i & 0x007FFFFF) - 0x00400000

    @staticmethod
    def make_qkx2_quants(n, nmax, x, weights, rmin, rdelta, nstep):
        L = [0] * n
        mn, mx = x[0], x[0]
        sum_w = weights[0]
        sum_x = F(sum_w * x[0])
        for i in range(1, n):
            if x[i] < mn:
                mn = x[i]
            if x[i] > mx:
                mx = x[i]
            sum_w = F(sum_w + weights[i])
            sum_x = F(sum_x + F(weights[i] * x[i]))
        if mn > 0:
            mn = F(0)
        if mx == mn:
            return F(0), F(-mn), [0] * n
        iscale = F(F(nmax) / F(mx - mn))
        scale = F(F(1) / iscale)
        best_error = F(0)
        for i in range(n):
            L[i] = max(0, min(nmax, _C.nearest_int(F(iscale * F(x[i] - mn)))))
            diff = F(F(F(scale * F(L[i])) + mn) - x[i])
            best_error = F(best_error + F(weights[i] * F(diff * diff)))
        for step in range(nstep + 1):
            iscale = F(F(F(F(rmin) + F(F(rdelta) * F(step))) + F(nmax)) / F(mx - mn))
            laux = []
            sum_l = sum_l2 = sum_xl = F(0)
            for i in range(n):
                lv = max(0, min(nmax, _C.nearest_int(F(iscale * F(x[i] - mn)))))
                laux.append(lv)
                w = weights[i]
                sum_l = F(sum_l + F(w * F(lv)))
                sum_l2 = F(sum_l2 + F(F(w * F(lv)) * F(lv)))
                sum_xl = F(sum_xl + F(F(w * F(lv)) * x[i]))
            det = F(F(sum_w * sum_l2) - F(sum_l * sum_l))
            if det > 0:
                this_scale = F(F(F(sum_w * sum_xl) - F(sum_x * sum_l)) / det)
                this_min = F(F(F(sum_l2 * sum_x) - F(sum_l * sum_xl)) / det)
                if this_min > 0:
                    this_min = F(0)
                    this_scale = F(sum_xl / sum_l2)
                cur_error = F(0)
                for i in range(n):
                    diff = F(F(F(this_scale * F(laux[i])) + this_min) - x[i])
                    cur_error = F(cur_error + F(weights[i] * F(diff * diff)))
                if cur_error < best_error:
                    L, best_error, scale, mn = laux, cur_error, this_scale, this_min
        return scale, F(-mn), L

    @staticmethod
    def make_qx_quants(n, nmax, x):  # rmse_type 1, quant_weights NULL
        mx, amax = F(0), F(0)
        for i in range(n):
            if abs(x[i]) > amax:
                amax, mx = abs(x[i]), x[i]
        if amax < F(1e-15):
            return F(0), [0] * n
        L = [0] * n
        iscale = F(F(-nmax) / mx)
        sumlx = suml2 = F(0)
        for i in range(n):
            lv = max(-nmax, min(nmax - 1, _C.nearest_int(F(iscale * x[i]))))
            L[i] = lv + nmax
            w = F(x[i] * x[i])
            sumlx = F(sumlx + F(F(w * x[i]) * F(lv)))
            suml2 = F(suml2 + F(F(w * F(lv)) * F(lv)))
        scale = F(sumlx / suml2) if suml2 else F(0)
        best = F(scale * sumlx)
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = F(-F(F(nmax) + F(F(0.1) * F(step))) / mx)
            sumlx = suml2 = F(0)
            for i in range(n):
                lv = max(-nmax, min(nmax - 1, _C.nearest_int(F(iscale * x[i]))))
                w = F(x[i] * x[i])
                sumlx = F(sumlx + F(F(w * x[i]) * F(lv)))
                suml2 = F(suml2 + F(F(w * F(lv)) * F(lv)))
            if suml2 > 0 and F(sumlx * sumlx) > F(best * suml2):
                for i in range(n):
                    L[i] = nmax + max(-nmax, min(nmax - 1, _C.nearest_int(F(iscale * x[i]))))
                scale = F(sumlx / suml2)
                best = F(scale * sumlx)
        return scale, L

    @staticmethod
    def get_scale_min_k4(j, q):
        if j < 4:
            return q[j] & 63, q[j + 4] & 63
        return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)

    @staticmethod
    def kx_ref(x, nmax, rmin, rdelta, nstep):
        """The common body of quantize_row_q4_K_ref / quantize_row_q5_K_ref: (d, dmin, scales[12], L[256])."""
        L = [0] * QK_K
        scales, mins = [], []
        max_scale = max_min = F(0)
        for j in range(8):
            sub = x[32 * j:32 * j + 32]
            sum_x2 = F(0)
            for v in sub:
                sum_x2 = F(sum_x2 + F(v * v))
            av_x = F(np.sqrt(F(sum_x2 / F(32))))
            weights = [F(av_x + F(abs(v))) for v in sub]
            scale, the_min, L[32 * j:32 * j + 32] = _C.make_qkx2_quants(32, nmax, sub, weights, rmin, rdelta, nstep)
            scales.append(scale)
            mins.append(the_min)
            if scale > max_scale:
                max_scale = scale
            if the_min > max_min:
                max_min = the_min
        inv_scale = F(F(63) / max_scale) if max_scale > 0 else F(0)
        inv_min = F(F(63) / max_min) if max_min > 0 else F(0)
        sc = [0] * 12
        for j in range(8):
            ls = min(63, _C.nearest_int(F(inv_scale * scales[j])) & 0xFF)
            lm = min(63, _C.nearest_int(F(inv_min * mins[j])) & 0xFF)
            if j < 4:
                sc[j], sc[j + 4] = ls, lm
            else:
                sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                sc[j - 4] |= (ls >> 4) << 6
                sc[j] |= (lm >> 4) << 6
        d, dmin = np.float16(F(max_scale / F(63))), np.float16(F(max_min / F(63)))
        for j in range(8):
            s, m = _C.get_scale_min_k4(j, sc)
            dj = F(F(d) * F(s))
            if not dj:
                continue
            dm = F(F(dmin) * F(m))
            for ii in range(32):
                L[32 * j + ii] = max(0, min(nmax, _C.nearest_int(F(F(x[32 * j + ii] + dm) / dj))))
        return d, dmin, sc, L

    @staticmethod
    def q4_k(x):
        d, dmin, sc, L = _C.kx_ref(x, 15, -1.0, 0.1, 20)
        qs = [L[j + lv] | (L[j + lv + 32] << 4) for j in range(0, QK_K, 64) for lv in range(32)]
        return d.tobytes() + dmin.tobytes() + bytes(sc) + bytes(qs)

    @staticmethod
    def q5_k(x):
        d, dmin, sc, L = _C.kx_ref(x, 31, -0.5, 0.1, 15)
        qh, ql = [0] * 32, []
        m1, m2 = 1, 2
        for n in range(0, QK_K, 64):
            for j in range(32):
                l1, l2 = L[n + j], L[n + j + 32]
                if l1 > 15:
                    l1 -= 16
                    qh[j] |= m1
                if l2 > 15:
                    l2 -= 16
                    qh[j] |= m2
                ql.append(l1 | (l2 << 4))
            m1 <<= 2
            m2 <<= 2
        return d.tobytes() + dmin.tobytes() + bytes(sc) + bytes(qh) + bytes(ql)

    @staticmethod
    def q6_k(x):
        L = [0] * QK_K
        scales = []
        max_scale = max_abs_scale = F(0)
        for ib in range(16):
            scale, L[16 * ib:16 * ib + 16] = _C.make_qx_quants(16, 32, x[16 * ib:16 * ib + 16])
            scales.append(scale)
            if abs(scale) > max_abs_scale:
                max_abs_scale, max_scale = abs(scale), scale
        if max_abs_scale < F(1e-15):
            return bytes(210)
        iscale = F(F(-128) / max_scale)
        d = np.float16(F(F(1) / iscale))
        q_scales = [int(np.array([min(127, _C.nearest_int(F(iscale * s)))]).astype(np.int8)[0]) for s in scales]
        for j in range(16):
            dj = F(F(d) * F(q_scales[j]))
            if not dj:
                continue
            for ii in range(16):
                L[16 * j + ii] = max(-32, min(31, _C.nearest_int(F(x[16 * j + ii] / dj)))) + 32
        ql, qh = [0] * 128, [0] * 64
        for half, j in enumerate(range(0, QK_K, 128)):
            for lv in range(32):
                q1, q2, q3, q4 = (L[j + lv + k] & 0xF for k in (0, 32, 64, 96))
                ql[64 * half + lv] = q1 | (q3 << 4)
                ql[64 * half + lv + 32] = q2 | (q4 << 4)
                qh[32 * half + lv] = ((L[j + lv] >> 4) | ((L[j + lv + 32] >> 4) << 2) | ((L[j + lv + 64] >> 4) << 4)
                                      | ((L[j + lv + 96] >> 4) << 6))
        return bytes(ql) + bytes(qh) + np.array(q_scales, np.int8).tobytes() + d.tobytes()


def _blocks(n: int, seed: int = 0) -> np.ndarray:
    """n super-blocks of 256 values, each of a kind that reaches a branch of the C code."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = i % 10
        x = rng.standard_normal(QK_K).astype(np.float32) * F(10.0 ** rng.uniform(-3, 1))
        if kind == 1:  # outliers
            x[rng.integers(0, QK_K, 3)] *= 40
        elif kind == 2:  # all-zero and constant sub-blocks
            x[:32] = 0
            x[32:64] = -0.25
            x[64:96] = 0.5
            x[96:112] = 0
        elif kind == 3:  # all positive: the min is clamped to 0
            x = np.abs(x) + F(0.1)
        elif kind == 4:  # all negative
            x = -np.abs(x) - F(0.05)
        elif kind == 5:  # one tiny sub-block: its 6-bit scale rounds to 0 and the fit's levels are kept
            x[:32] *= F(1e-4)
            x[200:216] *= F(1e-5)
        elif kind == 6:  # below GROUP_MAX_EPS in places, and a whole block of zeros every 20
            x[:16] = F(1e-20)
            if i % 20 == 6:
                x[:] = 0
        elif kind == 7:  # heavy tails
            x = rng.standard_t(2, QK_K).astype(np.float32)
        elif kind == 8:  # few distinct values (ties in the rounding)
            x = rng.integers(-4, 5, QK_K).astype(np.float32) * F(0.125)
        out.append(x)
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_the_vectorised_quantisers_write_the_c_references_bytes(name):
    blocks = _blocks(50)
    got = quantize(blocks, TYPES[name])
    reference = {"Q4_K": _C.q4_k, "Q5_K": _C.q5_k, "Q6_K": _C.q6_k}[name]
    with np.errstate(all="ignore"):
        expected = np.stack([np.frombuffer(reference(list(b)), np.uint8) for b in blocks])
    assert got.shape == expected.shape == (50, gguf.GGML_QUANT_SIZES[TYPES[name]][1])
    mismatched = [i for i in range(50) if not np.array_equal(got[i], expected[i])]
    assert not mismatched, (name, mismatched)


def test_hand_checked_blocks():
    """Bytes worked out by hand from the C code.

    Q6_K, x[0] = -1 and 255 zeros: make_qx_quants of sub-block 0 has max = -1, iscale = 32, levels -32 (x[0]) and
    0, scale 32 / 1024 = 1/32; none of the 18 other grids beats it (sumlx**2 > best * suml2 is 961 > 961 or
    1024 > 1024: false). The zero sub-blocks get scale 0 and L = 0. So iscale = -128 / (1/32) = -4096, d = fp16(-2**-12)
    (0x8C00), scales [-128, 0 x 15]; re-rounding sub-block 0 against 2**-5 gives L = 0 for x[0] and 32 for its
    zeros, and the zero sub-blocks keep L = 0. Packed: ql all 0 (every L is 0 or 32, low nibble 0), qh[l] holds
    L[l] >> 4 = 2 for l = 1..15.

    Q4_K, every value -0.5: each sub-block is flat (min = max), so scale 0 and min 0.5; max_min 0.5 stores every
    min as 63 against dmin = fp16(0.5 / 63), every scale as 0 against d = 0: bytes 0-3 are 0, bytes 4-7 are
    63 | (63 >> 4) << 6 = 0xFF, bytes 8-11 are 0 | (63 & 0xF) << 4 = 0xF0, and the 128 bytes of levels are 0.
    """
    x = np.zeros(QK_K, np.float32)
    x[0] = -1
    raw = quantize(x[None], TYPES["Q6_K"])[0]
    qh = [0] + [2] * 15 + [0] * 48
    assert raw.tobytes() == bytes(128) + bytes(qh) + bytes([0x80] + [0] * 15) + bytes([0x00, 0x8C])
    assert np.array_equal(gguf.quants.dequantize(raw[None], TYPES["Q6_K"])[0], x)

    raw = quantize(np.full((1, QK_K), -0.5, np.float32), TYPES["Q4_K"])[0]
    dmin = np.float16(F(0.5) / F(63))
    assert raw.tobytes() == (bytes(2) + dmin.tobytes() + bytes(4) + bytes([0xFF] * 4) + bytes([0xF0] * 4)
                             + bytes(128))
    assert np.allclose(gguf.quants.dequantize(raw[None], TYPES["Q4_K"]), -0.5, atol=0.5 * 2 ** -11)  # fp16 dmin
    assert not quantize(np.zeros((1, QK_K), np.float32), TYPES["Q4_K"]).any()  # zeros: all-zero bytes


def _rms_relative(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


def _naive_min_max(x: np.ndarray, sub: int, levels: int) -> np.ndarray:
    """Round each `sub`-value group onto `levels` evenly spaced values between its min and max (exact float scales:
    more generous than the format, which stores 6-bit scales)."""
    g = x.reshape(-1, sub)
    lo, hi = g.min(1, keepdims=True), g.max(1, keepdims=True)
    step = np.where(hi > lo, (hi - lo) / (levels - 1), 1)
    return (np.round((g - lo) / step) * step + lo).reshape(x.shape)


def _naive_abs_max(x: np.ndarray, sub: int, nmax: int) -> np.ndarray:
    g = x.reshape(-1, sub)
    step = np.abs(g).max(1, keepdims=True) / nmax
    step = np.where(step > 0, step, 1)
    return (np.clip(np.round(g / step), -nmax, nmax) * step).reshape(x.shape)


# RMS error relative to the RMS of Gaussian weights, measured on 256 rows of 2048: Q4_K 0.071, Q5_K 0.036,
# Q6_K 0.018 (gguf's Q4_1 0.078, Q5_1 0.038, Q8_0 0.0054). A uniform quantiser's RMS error is step / sqrt(12),
# and 4 bits over a Gaussian's ~5-sigma block range gives ~0.07. The bounds leave ~12% room.
@pytest.mark.parametrize(("name", "bound", "naive"), [
    ("Q4_K", 0.08, lambda x: _naive_min_max(x, 32, 16)),
    ("Q5_K", 0.04, lambda x: _naive_min_max(x, 32, 32)),
    ("Q6_K", 0.02, lambda x: _naive_abs_max(x, 16, 31)),
])
def test_round_trip_through_ggufs_own_dequantiser(name, bound, naive):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 8 * QK_K)).astype(np.float32) * F(0.02)
    x[3, 100] = 1.0  # an outlier
    x[5] = 0  # an all-zero row
    x[7] = 0.3  # a constant row
    raw = quantize(x, TYPES[name])
    block_bytes = gguf.GGML_QUANT_SIZES[TYPES[name]][1]
    assert raw.dtype == np.uint8 and raw.shape == (64, 8 * block_bytes)
    back = gguf.quants.dequantize(raw, TYPES[name])
    assert back.shape == x.shape
    assert np.array_equal(back[5], x[5])  # zeros stay exactly zero
    assert np.abs(back[7] - x[7]).max() <= 0.3 / 2 ** 10  # a constant is one level (fp16 rounding of the scale)
    gauss = np.delete(np.arange(64), [3, 5, 7])
    error = _rms_relative(back[gauss], x[gauss])
    assert error <= bound, (name, error)
    assert error <= _rms_relative(naive(x[gauss]), x[gauss]), name  # the search beats plain min/max rounding
    outlier_row = back[3] - x[3]
    assert abs(outlier_row[100]) <= 0.02  # the outlier is kept to a few percent


def test_q6_k_error_is_within_half_a_step_per_sub_block():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((32, QK_K)) * rng.uniform(0.001, 1, (32, 1))).astype(np.float32)
    raw = quantize(x, TYPES["Q6_K"])
    back = gguf.quants.dequantize(raw, TYPES["Q6_K"])
    d = raw[:, 208:210].view(np.float16).astype(np.float32)  # (32, 1)
    scales = raw[:, 192:208].view(np.int8).astype(np.float32)  # (32, 16)
    step = np.abs(d * scales)[:, :, None]  # one quantisation step per 16-value sub-block
    error = np.abs(back - x).reshape(32, 16, 16)
    # the level range is -32..31 times the step: within it rounding is at most half a step (plus float slack)
    assert (error <= step * 0.5 + 1e-6 + np.abs(x.reshape(32, 16, 16)) * 1e-6).all()


def test_rows_that_do_not_split_into_super_blocks_are_refused_and_other_types_fall_through():
    with pytest.raises(gguf.QuantError):
        quantize(np.zeros((2, 576), np.float32), TYPES["Q4_K"])
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    q8 = gguf.GGMLQuantizationType.Q8_0
    assert np.array_equal(quantize(x, q8), gguf.quants.quantize(x, q8))


def ggml_quantize_chunk(data: np.ndarray, qtype) -> np.ndarray:
    """The bytes ggml's compiled `ggml_quantize_chunk` writes (no importance matrix: the `_ref` quantisers)."""
    import ctypes
    from pathlib import Path

    lib = ctypes.CDLL(str(Path(libggml.__file__).parent / "lib64" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    data = np.ascontiguousarray(data, dtype=np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((data.shape[0], data.shape[1] // block * size), np.uint8)
    written = fn(int(qtype), data.ctypes.data, out.ctypes.data, 0, data.shape[0], data.shape[1], None)
    assert written == out.size
    return out


@pytest.mark.skipif(libggml is None, reason="libggml-python (prebuilt ggml, a dev dependency) is not installed")
@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_the_bytes_equal_ggmls_compiled_quantiser(name):
    rng = np.random.default_rng(4)
    for data in (_blocks(300, seed=5), (rng.standard_normal((32, 1536)) * 0.02).astype(np.float32)):
        assert np.array_equal(quantize(data, TYPES[name]), ggml_quantize_chunk(data, TYPES[name])), name
