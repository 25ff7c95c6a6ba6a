"""Kernel choice where the default CPU one is measurably slow: the linears, RMSNorm, and decode
attention's two passes over the KV cache.

Kept apart from `model.py` so the model math stays free of device checks.
"""
from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from runner.model import native
from runner.model.int8 import Int8Weight, dequantize


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


def linear(x: Tensor, w: Tensor | Int8Weight, b: Tensor | None = None) -> Tensor:
    """F.linear, through oneDNN on CPU fp32 (w plain or from `pack`); an int8 weight through `linear_int8`.

    MKL's sgemm (F.linear's CPU path) handles the skinny (few-row) products of decode poorly.
    On this project's current 2-core AVX-512 machine, an ad-hoc microbenchmark (not a committed
    CSV; the hf-vs-alisa bench shows the end-to-end effect) ran SmolLM2's decode linears faster
    through oneDNN at every batch from 1 to 64, and prefill-sized products too. The earlier
    2-core AVX2 machine favoured MKL for the narrow down projection only, by a little. Same fp32
    math, no weight copy; one kernel everywhere keeps results independent of shape choices.
    """
    if isinstance(w, Int8Weight):
        return linear_int8(x, w, b)
    if w.is_mkldnn or (x.device.type == "cpu" and x.dtype == w.dtype and _onednn_dtype(w.dtype)):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")
    return F.linear(x, w, b)


# Rows up to which `linear_int8` runs torch's weight-only int8 kernel; above, it dequantizes the weight.
# Ad-hoc microbenchmark, 1 thread (the 2 cores were shared; rough): SmolLM2's gate_up (3072x576) took
# 89 us at 1 row (packed bf16 167, packed fp32 302), 338 at 8 (bf16 167), 2.7 ms at 64 (dequantize to
# bf16 + oneDNN 4.1, noisy) and 21.6 ms at 512 (dequantize + bf16 2.8): its cost grows with the rows
# (no blocking over them) while dequantizing once is amortized by many rows.
INT8_KERNEL_MAX_ROWS = 64
_INT8_K_MULTIPLE = 16  # torch 2.13's kernel reads the input dim in blocks: other sizes crashed or were wrong


def linear_int8(x: Tensor, w: Int8Weight, b: Tensor | None = None) -> Tensor:
    """x (..., in) @ dequantize(w).T (+ b), in x's dtype (fp32 or bf16; others dequantize to x's dtype).

    On the CPU, at decode's few rows: torch's weight-only int8 kernel (`_weight_int8pack_mm`, gpt-fast's),
    which reads the int8 weight once, a quarter of fp32's bytes. It runs only in bf16 (with fp32 x it
    was 5-10x slower): x is rounded to bf16 and so is each output, one rounding each (relative 2^-9),
    smaller than the weight's quantization error (`runner.model.int8`). With more rows, the weight is
    dequantized to bf16 (exact where the scale is: q * scale needs at most 15 bits; else one rounding)
    for oneDNN's native bf16 product where the CPU has one, else to x's dtype for F.linear.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    kernel_ok = (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                 and w.q.shape[1] % _INT8_K_MULTIPLE == 0)
    if kernel_ok and 0 < rows <= INT8_KERNEL_MAX_ROWS:
        x2 = x.reshape(rows, x.shape[-1]).to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(x2, w.q, w.scale).reshape(*x.shape[:-1], -1).to(x.dtype)
    elif kernel_ok and _BF16_DOT:
        wd = dequantize(w, torch.bfloat16)
        out = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16).contiguous(), wd, None, "none", [], "").to(x.dtype)
    else:
        out = F.linear(x, dequantize(w, x.dtype))
    return out if b is None else out + b


def weight_rows(w: Tensor | Int8Weight, rows: slice) -> Tensor | Int8Weight:
    """Output rows `rows` of a linear weight, packed (copied out), plain or int8 (q and scale sliced)."""
    if isinstance(w, Int8Weight):
        return Int8Weight(w.q[rows], w.scale[rows])
    return plain(w)[rows]


def _onednn_dtype(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs linears of this dtype well here: fp32, and bf16 where the CPU has native
    bf16 dot products (oneDNN accumulates them in fp32; without them it emulates bf16, slowly)."""
    return _ONEDNN and (dtype == torch.float32 or (dtype == torch.bfloat16 and _BF16_DOT))


def pack(w: Tensor) -> Tensor:
    """w (out, in) reordered once into oneDNN's blocked layout, where `linear` would use it (fp32,
    or bf16 on a CPU with native bf16 dot products).

    Given a plain weight, oneDNN reorders it into that layout on every call: at decode's few rows
    the reorder re-reads and re-writes the whole weight, a second pass over memory per product.
    The packed tensor is opaque (no slicing, no storage): `plain` gets the matrix back. Same
    values and the same kernel; results equal the unpacked call's bit for bit from 2 rows up,
    and within fp32 rounding (another summation order) at 1 row. Anything else is returned as is.
    """
    return _reorder(w, w.dtype) if _onednn_dtype(w.dtype) else w


def pack_bf16(w: Tensor) -> Tensor:
    """A bf16 matrix (out, in) packed like `pack` does fp32 ones (the greedy head's screen,
    `runner.model.greedy_head`); as is without oneDNN or off the CPU."""
    return _reorder(w, torch.bfloat16)


def _reorder(w: Tensor, dtype: torch.dtype) -> Tensor:
    if _ONEDNN and not w.is_mkldnn and w.device.type == "cpu" and w.dtype == dtype and w.dim() == 2:
        return torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
    return w


# Native bf16 dot products (vdpbf16ps, AMX). Without them oneDNN emulates bf16, far slower than fp32.
_BF16_DOT = _ONEDNN and bool({"avx512_bf16", "amx_bf16"} & native.cpu_flags())


def native_bf16() -> bool:
    """Whether this CPU has native bf16 dot products that oneDNN uses (`dtype: auto` may pick bf16)."""
    return _BF16_DOT


SCREEN_ENV = "ALISA_BF16_SCREEN"  # "0" turns the greedy head's bf16 screen off


def bf16_screen(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether greedy decoding should screen the vocabulary in bf16 (`runner.model.greedy_head`): an
    fp32 or bf16 model on a CPU with bf16 dot products, unless ALISA_BF16_SCREEN=0. On this project's
    2-core AVX512-BF16 machine an ad-hoc microbenchmark (not a committed CSV; hf-vs-alisa shows
    the end-to-end effect) ran SmolLM2's packed bf16 head in well under half the fp32 head's
    time from 1 to 64 rows. A bf16 model's screen is its own head, packed (a tied head's plain
    matrix stays the embedding's), with the candidates rechecked in fp32."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _BF16_DOT
            and os.environ.get(SCREEN_ENV, "1") != "0")


def plain(w: Tensor) -> Tensor:
    """The (out, in) matrix of a weight, packed or not (a packed one is copied out)."""
    return w.to_dense() if w.is_mkldnn else w


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim: natively in one pass per row for fp32 or bf16 CPU tensors (torch's
    CPU rms_norm is about eight elementwise kernels, mostly dispatch at decode's few rows; in bf16 two
    casts more), else F.rms_norm. Same order of operations as HF's LlamaRMSNorm, in fp32 (a bf16 row
    rounded once at the end, as F.rms_norm does); the sum of squares may round differently (another
    summation order)."""
    lib = None
    if (x.dtype == w.dtype and x.dtype in _NATIVE_DTYPES and x.device.type == "cpu" and w.device.type == "cpu"
            and not (x.requires_grad or w.requires_grad) and w.dim() == 1 and w.is_contiguous()):
        lib = native.status().library
    if lib is None:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    x = x.contiguous()
    out = torch.empty_like(x)
    d = x.shape[-1]
    norm = lib.rms_norm if x.dtype == torch.float32 else lib.rms_norm_bf16
    norm(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.numel() // d if d else 0, d, eps, torch.get_num_threads())
    return out


# ---- decode attention ---------------------------------------------------------------------------
_NATIVE_MAX_D = 256  # runner/model/csrc/decode_attention.c: MAX_D; d must also be a multiple of 16
# What the native kernels take: fp32, and bf16 (K/V or norm rows) widened to fp32 as they are read.
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _native_head_dim(d: int) -> bool:
    return d % 16 == 0 and d <= _NATIVE_MAX_D


def _native_for(x: Tensor, parts: list[Tensor]) -> ctypes.CDLL | None:
    """The native library if it takes these tensors (queries or probabilities `x`, K or V `parts`):
    CPU, K/V parts all fp32 or all bf16 (x in either: it is widened first), no autograd, a head dim it
    was built for, each part's rows of d contiguous."""
    d = parts[0].shape[-1]
    if not _native_head_dim(d) or len({t.dtype for t in parts}) > 1:
        return None
    for t in (x, *parts):
        if t.dtype not in _NATIVE_DTYPES or t.device.type != "cpu" or t.dim() != 4 or t.requires_grad:
            return None
    if any(x.stride(-1) != 1 or (x.shape[-2] > 1 and x.stride(-2) != d) for x in parts):
        return None
    return native.status().library


def decode_attention_kernel(head_dim: int, device: torch.device, dtype: torch.dtype) -> str:
    """What decode attention runs on for this model and device: "native" or "torch" (a CSV column,
    so a slow row can be told from a machine without a compiler)."""
    usable = device.type == "cpu" and dtype in _NATIVE_DTYPES and _native_head_dim(head_dim)
    return "native" if usable and native.status().available else "torch"


def decode_scores(qg: Tensor, ks: list[Tensor], scale: float) -> Tensor:
    """scale * qg @ K^T over the parts of K, side by side: qg (b, kvh, g, d), each part
    (b, kvh, t_i, d) -> (b, kvh, g, sum t_i).

    Natively, each key's score is the same tree of sums whatever part or slot holds it (so a
    sparse selection scores a token exactly as the dense cache does), written straight into one
    buffer (no concatenation), in fp32 (bf16 queries and keys widened, exactly); else batched
    matmuls in the inputs' dtype.
    """
    lib = _native_for(qg, ks)
    if lib is None:
        parts = [torch.matmul(qg, k.transpose(-1, -2)) for k in ks]  # (b, kvh, g, t_i)
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)) * scale
    b, kvh, g, d = qg.shape
    total = sum(k.shape[2] for k in ks)
    q = qg.float().contiguous()
    scores = torch.empty((b, kvh, g, total), dtype=torch.float32)
    kernel = lib.decode_scores if ks[0].dtype == torch.float32 else lib.decode_scores_bf16
    offset = 0
    for k in ks:
        t = k.shape[2]
        if t and b:
            kernel(q.data_ptr(), k.data_ptr(), scores.data_ptr() + 4 * offset, b * kvh, g, d, t,
                   k.stride(0), k.stride(1), kvh, total, scale, torch.get_num_threads())
        offset += t
    return scores


def decode_values(probs: Tensor, vs: list[Tensor]) -> Tensor:
    """probs @ V over the parts of V: probs (b, kvh, g, sum t_i), each part (b, kvh, t_i, d) ->
    (b, kvh, g, d). Natively one running sum per output in fp32 (bf16 values widened), continued
    across the parts in order (so it equals the sum over their concatenation); else a matmul per
    part, added, in the inputs' dtype."""
    lib = _native_for(probs, vs)
    sizes = [v.shape[2] for v in vs]
    if lib is None:
        out = None
        for p, v in zip(probs.split(sizes, dim=-1), vs):
            out = torch.matmul(p, v) if out is None else out.add_(torch.matmul(p, v))  # (b, kvh, g, d)
        return out
    b, kvh, g, total = probs.shape
    d = vs[0].shape[-1]
    p = probs.float().contiguous()
    out = torch.empty((b, kvh, g, d), dtype=torch.float32)
    kernel = lib.decode_values if vs[0].dtype == torch.float32 else lib.decode_values_bf16
    offset = 0
    for i, v in enumerate(vs):
        if b:
            kernel(p.data_ptr() + 4 * offset, v.data_ptr(), out.data_ptr(), b * kvh, g, d, v.shape[2],
                   v.stride(0), v.stride(1), kvh, total, int(i > 0), torch.get_num_threads())
        offset += v.shape[2]
    return out
