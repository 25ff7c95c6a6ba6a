"""The native few-row linears (runner/model/csrc/linear_rows.c through `kernels.linear` and
`kernels.swiglu`): bf16 and int8 weights against float64 products of the same values, each output the
same whatever the row count or thread count, and the residual and SwiGLU epilogues."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runner.model import int8, kernels, native

needs_native = pytest.mark.skipif(not native.status().available, reason="no C compiler: the torch path runs")
U32 = 2.0 ** -24


def _data(rows: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)


def _exact(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x @ w.T in float64 (exact enough: fp32 sums of k products are what is checked) and |x| @ |w|.T."""
    return x.double() @ w.double().T, x.abs().double() @ w.abs().double().T


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [16, 40, 960])  # 40: a last block of 8 columns
def test_bf16_rows_are_the_fp32_sum_rounded_once(rows, n):
    x, w = (t.bfloat16() for t in _data(rows, n, 576))
    out = kernels.linear(x, w)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    ref, mag = _exact(x, w)
    # One rounding to bf16 (2^-8 relative: 8 significant bits, of the result) after an fp32 sum of exact products (k u |x||w|).
    bound = 2.0 ** -8 * ref.abs() * (1 + 2.0 ** -7) + 576 * U32 * mag
    assert bool(((out.double() - ref).abs() <= bound).all())
    missed, _ = _exact(x[:, 16:], w[:, 16:])  # a kernel that skipped a block of 16 columns would fail it
    assert not bool(((missed - ref).abs() <= bound).all())


@needs_native
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 64])
def test_int8_rows_multiply_the_int8_values_exactly(xdtype, rows):
    x, w = _data(rows, 200, 1536, seed=1)
    x, qw = x.to(xdtype), int8.quantize(w)
    out = kernels.linear(x, qw)
    assert out.dtype == xdtype
    ref, mag = _exact(x, int8.dequantize(qw))
    rounding = 2.0 ** -8 * ref.abs() * (1 + 2.0 ** -7) if xdtype == torch.bfloat16 else 0
    # fp32 x is used as given (not rounded to bf16, as torch's int8 kernel does): only the fp32 sum and
    # the scale's multiplication round.
    bound = rounding + 1538 * U32 * mag
    assert bool(((out.double() - ref).abs() <= bound).all())


@needs_native
@pytest.mark.parametrize("weight", ["bf16", "int8"])
def test_a_row_does_not_depend_on_its_batch_or_the_threads(weight):
    x, w = _data(4, 72, 576, seed=2)
    w = w.bfloat16() if weight == "bf16" else int8.quantize(w)
    x = x.bfloat16()
    together = kernels.linear(x, w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([kernels.linear(x[i:i + 1], w) for i in range(4)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone)  # the same tree of the same products, bit for bit


@needs_native
@pytest.mark.parametrize("weight", ["bf16", "int8"])
def test_residual_is_added_before_the_one_rounding(weight):
    x, w = _data(2, 48, 576, seed=3)
    x = x.bfloat16()
    res = torch.randn(2, 48).bfloat16()
    w = w.bfloat16() if weight == "bf16" else int8.quantize(w)
    dense = w.double() if weight == "bf16" else int8.dequantize(w).double()
    out = kernels.linear(x, w, residual=res)
    ref = x.double() @ dense.T + res.double()
    bound = 2.0 ** -8 * ref.abs() * (1 + 2.0 ** -7) + 578 * U32 * (x.abs().double() @ dense.abs().T + res.abs().double())
    assert bool(((out.double() - ref).abs() <= bound).all())


@needs_native
@pytest.mark.parametrize("weight", ["bf16", "int8"])
def test_swiglu_is_silu_of_the_gate_times_up(weight):
    x, w = _data(3, 2 * 40, 576, seed=4)
    x = x.bfloat16()
    w = w.bfloat16() if weight == "bf16" else int8.quantize(w)
    dense = w.double() if weight == "bf16" else int8.dequantize(w).double()
    out = kernels.swiglu(x, w)
    assert out.shape == (3, 40) and out.dtype == torch.bfloat16
    gate, up = (x.double() @ dense.T).chunk(2, dim=-1)
    ref = F.silu(gate) * up
    # fp32 gate and up (k u |x||w| each), silu in fp32 (a few ulps), one rounding to bf16.
    mag_gate, mag_up = (x.abs().double() @ dense.abs().T).chunk(2, dim=-1)
    bound = 2.0 ** -8 * ref.abs() * 1.01 + 600 * U32 * (mag_gate * up.abs() + mag_up * gate.abs() + mag_gate * mag_up)
    assert bool(((out.double() - ref).abs() <= bound).all())


def test_shapes_the_kernel_does_not_take_fall_back_to_torch():
    x, w = _data(8, 24, 70, seed=5)  # k = 70: no multiple of 16
    xb, wb = x.bfloat16(), w.bfloat16()
    torch.testing.assert_close(kernels.linear(xb, wb), F.linear(xb, wb))
    torch.testing.assert_close(kernels.swiglu(xb, wb), F.silu(F.linear(xb, wb[:12])) * F.linear(xb, wb[12:]))
    x16, w16 = _data(9, 24, 64, seed=6)  # 9 rows of bf16: above NATIVE_ROWS_MAX, oneDNN or F.linear
    res = torch.randn(9, 24).bfloat16()
    torch.testing.assert_close(kernels.linear(x16.bfloat16(), w16.bfloat16(), residual=res),
                               F.linear(x16.bfloat16(), w16.bfloat16()) + res)


def test_plain_pays_only_for_few_bf16_rows():
    assert not kernels.plain_pays(torch.float32, 1)
    assert not kernels.plain_pays(torch.bfloat16, kernels.NATIVE_ROWS_MAX + 1)
    assert kernels.plain_pays(torch.bfloat16, 1) == native.status().available
