"""Kernel choice for the linears, where the default CPU one is measurably slow.

Kept apart from `model.py` so the model math stays free of device checks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _has_onednn_linear() -> bool:
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _has_onednn_linear()
# The row count oneDNN picks its packed weight layout for. Any row count runs on any layout; an
# ad-hoc microbenchmark on this project's 2-core AVX-512 machine found hints 8 and 32 equally fast
# from 1 to 64 rows, and hint 1 no faster than no packing.
PACK_ROWS = 32


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear, through oneDNN on CPU fp32 (w plain or from `pack`).

    MKL's sgemm (F.linear's CPU path) handles the skinny (few-row) products of decode poorly.
    On this project's current 2-core AVX-512 machine, an ad-hoc microbenchmark (not a committed
    CSV; the hf-vs-alisa bench shows the end-to-end effect) ran SmolLM2's decode linears faster
    through oneDNN at every batch from 1 to 64, and prefill-sized products too. The earlier
    2-core AVX2 machine favoured MKL for the narrow down projection only, by a little. Same fp32
    math, no weight copy; one kernel everywhere keeps results independent of shape choices.
    """
    if w.is_mkldnn or (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32
                       and w.dtype == torch.float32):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")
    return F.linear(x, w, b)


def pack(w: Tensor) -> Tensor:
    """w (out, in) reordered once into oneDNN's blocked layout, where `linear` would use it.

    Given a plain weight, oneDNN reorders it into that layout on every call: at decode's few rows
    the reorder re-reads and re-writes the whole weight, a second pass over memory per product.
    The packed tensor is opaque (no slicing, no storage): `plain` gets the matrix back. Same
    values and the same kernel; results equal the unpacked call's bit for bit from 2 rows up,
    and within fp32 rounding (another summation order) at 1 row. Anything else is returned as is.
    """
    if _ONEDNN and not w.is_mkldnn and w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2:
        return torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
    return w


def plain(w: Tensor) -> Tensor:
    """The (out, in) matrix of a weight, packed or not (a packed one is copied out)."""
    return w.to_dense() if w.is_mkldnn else w
