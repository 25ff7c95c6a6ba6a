"""Kernel choice for the linears, where the default CPU one is measurably slow.

Kept apart from `model.py` so the model math stays free of device checks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _has_onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _has_onednn_linear()


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear, through oneDNN on CPU fp32.

    MKL's sgemm (F.linear's CPU path) handles the skinny (few-row) products of decode poorly.
    On this project's current 2-core AVX-512 machine, an ad-hoc microbenchmark (not a committed
    CSV; the hf-vs-alisa bench shows the end-to-end effect) ran SmolLM2's decode linears faster
    through oneDNN at every batch from 1 to 64, and prefill-sized products too. The earlier
    2-core AVX2 machine favoured MKL for the narrow down projection only, by a little. Same fp32
    math, no weight copy; one kernel everywhere keeps results independent of shape choices.
    """
    if _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")
    return F.linear(x, w, b)
