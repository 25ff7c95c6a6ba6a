"""Kernel choice for the few matmuls where the default one is measurably slow.

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


def wide_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear for weights with more output rows than input columns (LM head, QKV, gate/up).

    On x86 CPUs, MKL's sgemm blocks these shapes poorly at small batch; in ad-hoc
    microbenchmarks (not a committed CSV) oneDNN's linear ran
    the LM head (49152 x 576) 1.6-1.7x faster at batch 1-64 and QKV / gate-up 1.2-1.4x
    faster at batch 8 on the 2-core AVX2 machine (same fp32 math, no weight copy). For
    narrow weights (the MLP down projection) it was slower, so those keep F.linear.
    """
    if _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")
    return F.linear(x, w, b)
