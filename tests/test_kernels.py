"""The oneDNN linear must compute what F.linear computes, for wide and narrow weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runner import kernels


@pytest.mark.parametrize("shape, out_features, bias", [((1, 576), 49152, False), ((8, 1, 576), 960, True),
                                                      ((2, 37, 64), 320, True), ((3, 16), 16, False),
                                                      ((32, 1, 1536), 576, False)])
def test_linear_matches_f_linear(shape, out_features, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w = torch.randn(out_features, shape[-1], generator=g) * 0.05
    b = torch.randn(out_features, generator=g) if bias else None
    ref = F.linear(x, w, b)
    out = kernels.linear(x, w, b)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_linear_takes_non_contiguous_rows_and_other_dtypes():
    x = torch.randn(4, 6, 32)[:, -1]  # (4, 32) view with a row stride of 6*32, like the LM head input
    w = torch.randn(100, 32)
    torch.testing.assert_close(kernels.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)
    xb, wb = x.bfloat16(), w.bfloat16()
    assert kernels.linear(xb, wb).dtype == torch.bfloat16
    torch.testing.assert_close(kernels.linear(xb, wb), F.linear(xb, wb))


needs_onednn = pytest.mark.skipif(not kernels._ONEDNN, reason="this torch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 7, 32, 33, 300])
def test_packed_weight_gives_the_plain_weights_result(rows):
    # Same kernel, same values, a layout chosen once: bit-equal from 2 rows up. At 1 row oneDNN may
    # take another summation order (seen 2.4e-6 on outputs ~1), so that case gets fp32 rounding room.
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 576, generator=g), torch.randn(960, 576, generator=g) * 0.05, torch.randn(960)
    packed = kernels.pack(w)
    assert packed.is_mkldnn and not w.is_mkldnn
    ref, out = kernels.linear(x, w, b), kernels.linear(x, packed, b)
    if rows > 1:
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    x3 = x.view(1, rows, 576)  # (b, s, in) as the units call it
    assert torch.equal(kernels.linear(x3, packed, b)[0], out)


@needs_onednn
def test_plain_undoes_pack_and_pack_leaves_what_it_cannot_pack():
    w = torch.randn(64, 32)
    assert torch.equal(kernels.plain(kernels.pack(w)), w)
    assert kernels.plain(w) is w
    for other in (w.bfloat16(), torch.randn(8)):  # not fp32, not a matrix
        assert kernels.pack(other) is other
    packed = kernels.pack(w)
    assert kernels.pack(packed) is packed
