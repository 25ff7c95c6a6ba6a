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
from runner.model.int8 import GROUP, Int8Weight, dequantize


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


def linear(x: Tensor, w: Tensor | Int8Weight, b: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """x (..., in) @ w.T (+ b) (+ residual, of the output's shape and dtype: a layer's `h + linear(x)`).

    At decode's few rows, natively where linear_rows.c takes the tensors (`_rows`: bf16 or int8 weights,
    the residual added before the one rounding to bf16). Else an int8 weight through `_linear_int8`, a
    float one through oneDNN on CPU fp32 (w plain or from `pack`), and bf16 where native, else F.linear.

    MKL's sgemm (F.linear's CPU path) handles the skinny (few-row) products of decode poorly.
    On this project's current 2-core AVX-512 machine, an ad-hoc microbenchmark (not a committed
    CSV; the hf-vs-alisa bench shows the end-to-end effect) ran SmolLM2's decode linears faster
    through oneDNN at every batch from 1 to 64, and prefill-sized products too. The earlier
    2-core AVX2 machine favoured MKL for the narrow down projection only, by a little. Same fp32
    math, no weight copy; one kernel everywhere keeps results independent of shape choices.
    """
    out = _rows(x, w, "plain" if residual is None else "add", residual)
    if out is not None:
        return out if b is None else out + b
    if isinstance(w, Int8Weight):
        out = _linear_int8(x, w, b)
    elif w.is_mkldnn or (x.device.type == "cpu" and x.dtype == w.dtype and _onednn_dtype(w.dtype)):
        out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")
    else:
        out = F.linear(x, w, b)
    return out if residual is None else out + residual


def swiglu(x: Tensor, gate_up_w: Tensor | Int8Weight) -> Tensor:
    """silu(x @ gate.T) * (x @ up.T), gate and up the halves of gate_up_w's rows: (..., in) -> (..., f).
    Natively in one pass where `_rows` takes it (each output rounded once), else three torch ops."""
    out = _rows(x, gate_up_w, "glu", None)
    if out is not None:
        return out
    gate, up = linear(x, gate_up_w).chunk(2, dim=-1)  # (..., f) each
    return F.silu(gate).mul_(up)  # in place: one (..., f) temporary fewer


# Rows up to which an int8 weight runs a weight-only int8 kernel (native, else torch's); above, it is
# dequantized. Ad-hoc microbenchmark, 1 thread (the 2 cores were shared; rough): SmolLM2's gate_up
# (3072x576) took 89 us at 1 row in torch's kernel (packed bf16 167, packed fp32 302), 338 at 8 (bf16
# 167), 2.7 ms at 64 (dequantize to bf16 + oneDNN 4.1, noisy) and 21.6 ms at 512 (dequantize + bf16 2.8):
# its cost grows with the rows (no blocking over them) while dequantizing once is amortized by many
# rows. The native kernel matched or beat torch's from 1 to 32 rows (2 threads, a scratch script).
INT8_KERNEL_MAX_ROWS = 64
_K_MULTIPLE = 16  # both kernels read the input dim in blocks of 16 (torch 2.13's crashed or erred on others)

# Rows up to which a plain bf16 weight runs natively (linear_rows.c). A scratch microbenchmark of
# SmolLM2's four layer linears (2 threads, this project's AMX machine; not a CSV: the cpu-dtype bench
# shows the end-to-end effect) ran it 1.3-2.4x faster than oneDNN's packed bf16 at 1 and 2 rows and
# 1.1-2x at 4; at 8 rows oneDNN (AMX) was 1.3-2x faster.
NATIVE_ROWS_MAX = 4
_ROW_DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def _rows(x: Tensor, w: Tensor | Int8Weight, epilogue: str, residual: Tensor | None) -> Tensor | None:
    """x (..., k) @ w.T with `epilogue` ("plain", "add" residual, "glu") through linear_rows.c, or None
    where it does not take them: CPU tensors without autograd, k a multiple of 16, a plain bf16 weight
    with bf16 x up to NATIVE_ROWS_MAX rows, or an int8 one with fp32 or bf16 x up to INT8_KERNEL_MAX_ROWS.
    int8: products of x as given and the int8 values (exact in fp32), summed in fp32, times the row's
    scale; group-wise (Q8_0) int8: each value times its group's scale (exact) before the product.
    Runs once per linear of every decode step: the cheap tests come first (a few microseconds in all)."""
    if type(w) is Int8Weight:
        q, scale, max_rows, weight = w.q, w.scale, INT8_KERNEL_MAX_ROWS, "int8" if w.scale.dim() == 1 else "q8"
    elif w.dtype is torch.bfloat16 and x.dtype is torch.bfloat16 and not w.is_mkldnn:
        q, scale, max_rows, weight = w, None, NATIVE_ROWS_MAX, "bf16"
    else:
        return None
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if (not 0 < rows <= max_rows or k % _K_MULTIPLE or q.dim() != 2 or q.shape[1] != k or not (x.is_cpu and q.is_cpu)
            or x.requires_grad or q.requires_grad or not q.is_contiguous()):
        return None
    n = q.shape[0]
    if scale is not None and (scale.shape != ((n,) if weight == "int8" else (n, k // GROUP))
                              or scale.dtype is not (torch.bfloat16 if weight == "int8" else torch.float32)):
        return None  # what linear_rows.c reads (a group-wise scale also needs k to be a multiple of GROUP)
    fn = native.status().rows.get((weight, _ROW_DTYPES.get(x.dtype), epilogue))
    if fn is None:
        return None
    out = x.new_empty((*x.shape[:-1], n // 2 if epilogue == "glu" else n))
    if residual is not None:
        if residual.shape != out.shape or residual.dtype is not x.dtype or not residual.is_cpu:
            return None
        residual = residual.contiguous()
    fn(x.contiguous().data_ptr(), q.data_ptr(), None if scale is None else scale.contiguous().data_ptr(),
       out.data_ptr(), None if residual is None else residual.data_ptr(), rows, n, k, torch.get_num_threads())
    return out


def _linear_int8(x: Tensor, w: Int8Weight, b: Tensor | None = None) -> Tensor:
    """x (..., in) @ dequantize(w).T (+ b) in torch, in x's dtype (fp32 or bf16; others dequantize to x's
    dtype), where `_rows` does not run it.

    At decode's few rows, torch's weight-only kernel (`_weight_int8pack_mm`, gpt-fast's), which reads
    the int8 weight once (a quarter of fp32's bytes). It runs only in bf16 (with fp32 x it was 5-10x
    slower): x is rounded to bf16 and so is each output, one rounding each (relative 2^-8, bf16's unit roundoff), smaller
    than the weight's quantization error (`runner.model.int8`). With more rows, the weight is
    dequantized to bf16 (exact where the scale is: q * scale needs at most 15 bits; else one rounding)
    for oneDNN's native bf16 product where the CPU has one, else to x's dtype for F.linear.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    kernel_ok = (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                 and w.q.shape[1] % _K_MULTIPLE == 0)
    if kernel_ok and 0 < rows <= INT8_KERNEL_MAX_ROWS and w.scale.dim() == 1:  # torch's kernel: a scale per row
        x2 = x.reshape(rows, x.shape[-1]).to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(x2, w.q, w.scale).reshape(*x.shape[:-1], -1).to(x.dtype)
    elif kernel_ok and _BF16_DOT:
        wd = dequantize(w, torch.bfloat16)
        out = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16).contiguous(), wd, None, "none", [], "").to(x.dtype)
    else:
        out = F.linear(x, dequantize(w, x.dtype))
    return out if b is None else out + b


def plain_pays(dtype: torch.dtype, rows: int) -> bool:
    """Whether an all-resident model of `dtype` whose decode steps run `rows` rows should hold its linear
    weights plain, not packed (`pack`): bf16 at most NATIVE_ROWS_MAX rows, where the native kernel reads
    plain weights faster than oneDNN reads packed ones (prefill then runs oneDNN on the plain weights,
    which it reorders per call: a small cost next to hundreds of rows)."""
    return dtype == torch.bfloat16 and 0 < rows <= NATIVE_ROWS_MAX and native.status().available


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


def rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor | None:
    """x * cos + roll(x, d/2) * signed_sin natively (rope.c: in fp32, rounded once for bf16) for x (b, h, s, d)
    with unit stride in d and cos, sin (b, 1, s, d) contiguous, all fp32 or all bf16 on the CPU, no autograd;
    else None (the caller runs torch's ops)."""
    if (x.dim() != 4 or cos.shape != (x.shape[0], 1, *x.shape[2:]) or cos.shape != signed_sin.shape
            or x.dtype not in _NATIVE_DTYPES or x.dtype != cos.dtype or x.dtype != signed_sin.dtype
            or x.stride(-1) != 1 or x.shape[-1] % 2 or not (cos.is_contiguous() and signed_sin.is_contiguous())
            or any(t.device.type != "cpu" or t.requires_grad for t in (x, cos, signed_sin))):
        return None
    lib = native.status().library
    if lib is None:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    fn = lib.rope if x.dtype == torch.float32 else lib.rope_bf16
    fn(x.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), out.data_ptr(), *x.shape, *x.stride()[:3],
       torch.get_num_threads())
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


def decode_softmax(scores: Tensor) -> Tensor:
    """softmax over the last dim of decode's scores (b, kvh, g, t): natively in place for the fp32 scores
    the native kernels write (the same code as `decode_attend`'s, so both give the same probabilities),
    else torch.softmax."""
    lib = native.status().library
    if lib is None or scores.dtype != torch.float32 or scores.device.type != "cpu" or not scores.is_contiguous():
        return torch.softmax(scores, dim=-1)
    t = scores.shape[-1]
    if t and scores.numel():
        lib.decode_softmax(scores.data_ptr(), scores.numel() // t, t, torch.get_num_threads())
    return scores


def decode_attend(qg: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor] | None:
    """softmax(scale * qg @ K^T) @ V natively in one call: qg (b, kvh, g, d), k and v (b, kvh, t, d) one
    part each -> (out (b, kvh, g, d), probs (b, kvh, g, t)), fp32, bit for bit what `decode_scores`,
    `decode_softmax` and `decode_values` give. None where the native kernels do not take the tensors."""
    lib = _native_for(qg, [k, v])
    if lib is None or k.shape != v.shape:
        return None
    b, kvh, g, d = qg.shape
    t = k.shape[2]
    q = qg.float().contiguous()
    probs = torch.empty((b, kvh, g, t), dtype=torch.float32)
    out = torch.empty((b, kvh, g, d), dtype=torch.float32)
    if t and b:
        fn = lib.decode_attend if k.dtype == torch.float32 else lib.decode_attend_bf16
        fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), probs.data_ptr(), out.data_ptr(), b * kvh, g, d, t,
           k.stride(0), k.stride(1), v.stride(0), v.stride(1), kvh, scale, torch.get_num_threads())
    return out, probs
