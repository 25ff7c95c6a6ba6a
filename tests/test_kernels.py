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
