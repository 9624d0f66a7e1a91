"""The native bf16 kernels (honellm/native.py): the same results as torch's products, and a quiet
fallback to them wherever the kernels cannot be built or do not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from honellm import native


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
