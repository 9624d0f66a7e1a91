"""The native bf16 kernels (honellm/core/native.py): the same results as torch's products, and a quiet
fallback to them wherever the kernels cannot be built or do not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from honellm.core import native


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A native module that builds (or declines) afresh, into a private cache, and is forgotten afterwards."""
    monkeypatch.setenv("HONE_CACHE", str(tmp_path / "cache"))
    native._reset()
    yield native
    native._reset()


def needs_kernel():
    reason = native.status()
    if not reason.startswith("native"):
        pytest.skip(f"the native kernels are not available here: {reason}")


def needs_amx():
    if not native.amx_available():
        pytest.skip(f"no AMX kernels here: {native.status()}")


@pytest.mark.parametrize("rows, cols", [(1, 32), (7, 100), (45, 576), (300, 1536), (1003, 576), (8, 2050)])
def test_native_mv_equals_torch_mv_up_to_the_last_rounding(rows, cols):
    needs_kernel()
    generator = torch.Generator().manual_seed(rows * cols)
    weight = (torch.randn(rows, cols, generator=generator) * 0.05).to(torch.bfloat16)
    x = torch.randn(cols, generator=generator).to(torch.bfloat16)
    ours, theirs = native.mv(weight, x), torch.mv(weight, x)
    reference = weight.float() @ x.float()
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows,)
    # Both sum in fp32 and round once; only the order of the sums differs, so at most one bf16 step apart.
    assert torch.allclose(ours.float(), reference, rtol=2 ** -7, atol=1e-4)
    assert torch.allclose(ours.float(), theirs.float(), rtol=2 ** -7, atol=1e-4)
    if rows >= 100:  # last-bit differences are rare (none here; torch's kernel varies by CPU)
        assert (ours == theirs).float().mean() >= 0.9


def test_native_mv_reads_rows_with_a_stride():
    """A weight that is a column slice of a wider matrix (row stride > columns) is read row by row correctly."""
    needs_kernel()
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(64, 640, generator=generator).to(torch.bfloat16)
    weight, x = wide[:, :576], torch.randn(576, generator=generator).to(torch.bfloat16)
    assert weight.stride(0) == 640
    assert torch.allclose(native.mv(weight, x).float(), torch.mv(weight, x).float(), rtol=2 ** -7, atol=1e-4)


def test_what_the_kernel_does_not_take_goes_to_torch_mv():
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(33, 64, generator=generator), torch.randn(64, generator=generator)
    assert torch.equal(native.mv(weight, x), torch.mv(weight, x))  # fp32
    weight16, x16 = weight.to(torch.bfloat16), x.to(torch.bfloat16)
    strided = torch.stack([x16, x16], dim=1)[:, 0]  # inner stride 2
    assert torch.equal(native.mv(weight16, strided), torch.mv(weight16, strided))
    leaf = weight16.clone().requires_grad_()
    out = native.mv(leaf, x16)  # autograd needs torch.mv's graph
    out.float().sum().backward()
    assert leaf.grad is not None and torch.equal(leaf.grad, x16.expand(33, 64))


def test_hone_native_0_keeps_torch_mv(fresh_native, monkeypatch):
    monkeypatch.setenv("HONE_NATIVE", "0")
    assert fresh_native.status() == "torch.mv and oneDNN (HONE_NATIVE=0)"
    assert not fresh_native.amx_available() and fresh_native.pack(torch.zeros(16, 32, dtype=torch.bfloat16)) is None
    weight, x = torch.randn(16, 64).to(torch.bfloat16), torch.randn(64).to(torch.bfloat16)
    assert torch.equal(fresh_native.mv(weight, x), torch.mv(weight, x))


def test_a_compiler_that_fails_means_torch_mv_and_no_error(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "false")  # exits 1 without output
    status = fresh_native.status()
    assert status.startswith("torch.mv and oneDNN ("), status
    weight, x = torch.randn(16, 64).to(torch.bfloat16), torch.randn(64).to(torch.bfloat16)
    assert torch.equal(fresh_native.mv(weight, x), torch.mv(weight, x))


def test_the_library_is_built_once_into_the_cache(fresh_native, tmp_path):
    if not fresh_native.status().startswith("native"):
        pytest.skip(f"the native kernels are not available here: {fresh_native.status()}")
    built = list((tmp_path / "cache" / "native").glob("hone_kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    fresh_native._reset()
    assert fresh_native.status().startswith("native")
    assert built[0].stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt
    assert not [p for p in (tmp_path / "cache" / "native").iterdir() if p != built[0]]  # no scratch left behind


@pytest.mark.parametrize("batch", [1, 3, 16, 17, 32, 33, 100])
@pytest.mark.parametrize("rows, cols", [(45, 96), (200, 576), (64, 1536)])
def test_amx_matmul_equals_f_linear_up_to_the_last_rounding(batch, rows, cols):
    """Every shape path: one and several 16-row tiles of x (and a second one beside it), weight blocks of 16 with
    a partial last one and an odd number of blocks."""
    needs_amx()
    generator = torch.Generator().manual_seed(batch * rows + cols)
    weight = (torch.randn(rows, cols, generator=generator) * 0.05).to(torch.bfloat16)
    x = torch.randn(batch, cols, generator=generator).to(torch.bfloat16)
    ours, theirs = native.matmul(x, native.pack(weight)), F.linear(x, weight)
    assert ours.shape == (batch, rows) and ours.dtype == torch.bfloat16
    assert torch.allclose(ours.float(), x.float() @ weight.float().T, rtol=2 ** -7, atol=1e-4)
    assert torch.allclose(ours.float(), theirs.float(), rtol=2 ** -7, atol=1e-4)
    if ours.numel() >= 100:  # bit-identical to oneDNN's AMX product here; allow rare last-bit differences
        assert (ours == theirs).float().mean() >= 0.9


def test_amx_matmul_takes_batched_inputs_row_strides_and_long_inputs_in_parts(monkeypatch):
    needs_amx()
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator).to(torch.bfloat16)
    tiles = native.pack(weight[:, :64])
    wide = torch.randn(2, 5, 80, generator=generator).to(torch.bfloat16)
    x = wide[..., :64]  # rows with a stride of 80
    monkeypatch.setattr(native, "MATMUL_ROWS", 4)  # 10 rows: three calls of at most 4
    out = native.matmul(x, tiles)
    assert out.shape == (2, 5, 48)
    assert torch.allclose(out.float(), F.linear(x, weight).float(), rtol=2 ** -7, atol=1e-4)


def test_pack_declines_what_the_amx_kernel_does_not_take():
    needs_amx()
    assert native.pack(torch.randn(16, 64)) is None  # fp32
    assert native.pack(torch.randn(16, 48).to(torch.bfloat16)) is None  # columns not a multiple of 32
    tiles = native.pack(torch.randn(17, 64).to(torch.bfloat16))
    assert (tiles.out_features, tiles.in_features) == (17, 64) and tiles.data.numel() == 32 * 64  # rows padded to 16


def test_the_first_call_may_come_under_autocast(fresh_native):
    """GRPO's rollouts call the engine under bf16 autocast: the load-time self-check must not be turned to bf16."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        status = fresh_native.status()
    fresh_native._reset()
    assert status == fresh_native.status()


def _bf16(*shape, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("rows, cols", [(1, 7), (5, 16), (37, 100), (284, 576)])
def test_native_rms_norm_and_its_gradient_equal_torchs_bf16_computation(rows, cols):
    """LlamaRMSNorm's bf16 arithmetic (normalise in fp32, round, scale by the weight) and autograd's gradient of it,
    with and without a vector tail; fp32 sums in another order may move a gradient by one bf16 step."""
    needs_kernel()
    x, weight, grad = _bf16(rows, cols, scale=3), _bf16(cols, seed=1), _bf16(rows, cols, seed=2)
    leaf = x.clone().requires_grad_()
    h = leaf.float()
    expected = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    expected.backward(grad)
    y, r = native.rms_norm(x, weight, 1e-5)
    assert y.dtype == torch.bfloat16 and r.shape == (rows,) and r.dtype == torch.float32
    assert torch.equal(y, expected.detach())
    g_x = native.rms_norm_backward(grad, x, r, weight)
    assert torch.allclose(g_x.float(), leaf.grad.float(), rtol=2 ** -7, atol=1e-3 * leaf.grad.abs().max().item())
    assert (g_x == leaf.grad).float().mean() >= 0.99


def test_native_rms_norm_reads_rows_with_a_stride_and_declines_what_it_does_not_take():
    needs_kernel()
    wide, weight = _bf16(6, 80, scale=2), _bf16(64, seed=1)
    x = wide[:, :64]  # rows with a stride of 80
    y, r = native.rms_norm(x, weight, 1e-6)
    assert torch.equal(y, native.rms_norm(x.contiguous(), weight, 1e-6)[0])
    grad = _bf16(6, 64, seed=2).t().contiguous().t()  # a column-major gradient is made row-major first
    assert torch.equal(native.rms_norm_backward(grad, x, r, weight),
                       native.rms_norm_backward(grad.contiguous(), x.contiguous(), r, weight))
    assert native.rms_norm(x.float(), weight, 1e-6) is None  # fp32
    assert native.rms_norm(x, weight.float(), 1e-6) is None
    assert native.rms_norm(x, weight[:32], 1e-6) is None  # a weight of another width


@pytest.mark.parametrize("rows, inner", [(1, 5), (3, 16), (7, 37), (284, 1536)])
def test_native_swiglu_and_its_gradient_equal_torch_bit_for_bit(rows, inner):
    """`F.silu(gate) * up` over [gate | up], and both halves of its gradient in one tensor (autograd's values)."""
    needs_kernel()
    z, grad = _bf16(rows, 2 * inner, scale=3), _bf16(rows, inner, seed=1)
    leaf = z.clone().requires_grad_()
    gate, up = leaf.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    expected.backward(grad)
    ours = native.swiglu(z)
    assert ours.shape == (rows, inner)
    assert (ours == expected.detach()).float().mean() >= 0.999  # fp32 exp rounding may differ from Sleef's
    assert torch.allclose(ours.float(), expected.detach().float(), rtol=2 ** -7, atol=1e-3)
    d_z = native.swiglu_backward(grad, z)
    assert (d_z == leaf.grad).float().mean() >= 0.999
    assert torch.allclose(d_z.float(), leaf.grad.float(), rtol=2 ** -7, atol=1e-3)
    assert native.swiglu(z.float()) is None and native.swiglu(z[:, :-1]) is None  # fp32; an odd width


def test_hone_native_0_turns_the_training_kernels_off(fresh_native, monkeypatch):
    monkeypatch.setenv("HONE_NATIVE", "0")
    assert not fresh_native.training_kernels()
    assert fresh_native.rms_norm(_bf16(4, 32), _bf16(32), 1e-5) is None
    assert fresh_native.swiglu(_bf16(4, 32)) is None


@pytest.mark.parametrize("prefix, batch, rest", [(28, 8, 32), (0, 3, 20), (5, 2, 1)])
def test_native_qkv_rotary_equals_torchs_rotation_and_layout_with_its_gradient(prefix, batch, rest):
    """The fast path's q|k|v split, rotary embedding and shared-prefix layout (keys and values of the prefix in front
    of every sequence's), against the torch operations it replaces, forward and backward, bit for bit."""
    from transformers.models.llama.modeling_llama import rotate_half

    needs_kernel()
    heads, kv_heads, d = 9, 3, 64
    rows = prefix + batch * rest
    qkv = _bf16(rows, (heads + 2 * kv_heads) * d, scale=2)
    angles = torch.randn(rows, d // 2, generator=torch.Generator().manual_seed(1)).repeat(1, 2)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    leaf = qkv.clone().requires_grad_()
    q, k, v = (t.view(1, rows, -1, d).transpose(1, 2) for t in leaf.split([heads * d, kv_heads * d, kv_heads * d], -1))
    q, k = (t * cos[None, None] + rotate_half(t) * sin[None, None] for t in (q, k))

    def split(t):
        return t[:, :, :prefix], t[0, :, prefix:].unflatten(1, (batch, rest)).transpose(0, 1)

    (q_prefix, q_rest), (k_prefix, k_rest), (v_prefix, v_rest) = split(q), split(k), split(v)
    expected = (q_prefix, q_rest, torch.cat([k_prefix.expand(batch, -1, -1, -1), k_rest], dim=2),
                torch.cat([v_prefix.expand(batch, -1, -1, -1), v_rest], dim=2))
    layout = native.Layout(prefix, batch, rest, heads, kv_heads, d)
    ours = native.qkv_rotary(qkv, cos, sin, layout)
    assert all(torch.equal(a, b.detach()) for a, b in zip(ours, expected, strict=True))
    grads = [_bf16(*t.shape, seed=i + 2) for i, t in enumerate(expected)]
    torch.autograd.backward(expected, grads)
    assert torch.equal(native.qkv_rotary_backward(tuple(grads), cos, sin, layout), leaf.grad)
    if not prefix:  # an unused output's gradient may be None
        assert torch.equal(native.qkv_rotary_backward((None, *grads[1:]), cos, sin, layout), leaf.grad)
    assert native.qkv_rotary(qkv.float(), cos, sin, layout) is None  # fp32
    assert native.qkv_rotary(qkv[:-1], cos[:-1], sin[:-1], layout) is None  # rows that do not match the layout
