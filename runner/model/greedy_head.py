"""Greedy decoding's argmax over the vocabulary, exact, for less than the fp32 head costs.

Greedy decoding needs only each row's largest logit. Where the CPU has bf16 dot products
(AVX512-BF16, AMX; `kernels.bf16_screen`), a bf16 copy of the head multiplies in well under
half the fp32 head's time (a scratch microbenchmark on this project's machine). Its logits a_v differ from the fp32 logits z_v by at most a bound e per
row (below), so only the tokens with a_v >= max(a) - 2e can hold the fp32 argmax. Those few
are recomputed in fp32 and the largest wins: the argmax of the fp32 logits, up to a tie
within fp32 rounding (the recomputed dot products sum in another order than a full fp32 head
would).

The bound, for one row x (fp32) against head row w_v, x' and w'_v their bf16 roundings,
u = 2^-24 (fp32's unit roundoff), K the width, |.| the 2-norm:
- |x.w_v - x'.w'_v| <= |x - x'| |w_v| + |x'| |w_v - w'_v|            (Cauchy-Schwarz, twice)
- accumulating x'.w'_v in fp32: <= K u |x'| |w'_v|  (a product of two bf16 is exact in fp32)
- rounding that sum to the bf16 output a_v: <= 2^-6 max_v |a_v|  (2^-7 relative, either
  rounding mode, taken against the rounded value)
- recomputing z_v = x.w_v in fp32: <= (K + 1) u |x| |w_v|
with the head's row norms replaced by their maxima over v (three numbers kept with the copy),
and 2^-20 added for products flushed to zero.

A bf16 model's head is its own screen (x' = x, w'_v = w_v: the first two terms vanish): its packed
copy multiplies at full speed and the candidates are rechecked in fp32 (products of bf16 values,
exact, summed in fp32), where the bf16 head alone would round every logit to 8 bits and break
near-ties arbitrarily.
"""
from __future__ import annotations

import torch
from torch import Tensor

from runner.model import kernels
SCREEN = "lm_w_bf16"  # the head unit's weight keys for the screen (next to its "lm_w")
NORMS = "lm_w_bf16_norms"  # (3,): max_v |w_v|, max_v |w_v - w'_v|, max_v |w'_v|

# Past this many candidates a row on average, the fp32 head is cheaper than rechecking them (each
# recheck gathers a head row). Real and seeded dummy heads give a handful; a head whose rows are
# nearly alike (degenerate, untrained) can give thousands.
MAX_CANDIDATES_PER_ROW = 256
_U32 = 2.0 ** -24
_CHUNK_ROWS = 4096  # head rows per step when building the screen: keeps the fp32 temporaries small


def build_screen(w: Tensor, pack: bool = True) -> dict[str, Tensor]:
    """The screen of head weight w (v, e): its bf16 copy (packed by `kernels.pack_bf16` unless not
    `pack`: a bf16 head is then its own screen, no copy) and the three row-norm maxima the bound needs."""
    wb = w.to(torch.bfloat16)
    norms = torch.zeros(3, dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], _CHUNK_ROWS):
        rows, rows_b = w[r:r + _CHUNK_ROWS].float(), wb[r:r + _CHUNK_ROWS].float()
        chunk = torch.stack([rows.norm(dim=-1).max(), (rows - rows_b).norm(dim=-1).max(), rows_b.norm(dim=-1).max()])
        norms = torch.maximum(norms, chunk)
    return {SCREEN: kernels.pack_bf16(wb) if pack else wb, NORMS: norms}


def greedy_tokens(x: Tensor, w: Tensor, screen: Tensor | None = None, norms: Tensor | None = None) -> Tensor:
    """x: (b, e) fp32 or bf16, w: (v, e) -> each row's argmax token of the fp32 logits x @ w.T (b,),
    through the screen when given (w then a plain matrix). Without one, where a bound is not
    finite (a non-finite x), or with too many candidates, the full fp32 logits decide."""
    if screen is None or norms is None:
        return kernels.linear(x, w).argmax(dim=-1)
    rows, cols, logits = screened_candidates(x, w, screen, norms)
    if rows is None:
        return logits.argmax(dim=-1)
    b, v = x.shape[0], w.shape[0]
    best = torch.full((b,), float("-inf"), dtype=logits.dtype, device=x.device).scatter_reduce(0, rows, logits, "amax")
    win = logits == best[rows]  # a row's top candidates; the lowest index wins a tie, as argmax's does
    return torch.full((b,), v, dtype=torch.long, device=x.device).scatter_reduce(0, rows[win], cols[win], "amin")


def screened_candidates(x: Tensor, w: Tensor, screen: Tensor,
                        norms: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """The screen's candidates: (rows (n,), token ids (n,), their fp32 logits (n,)), or
    (None, None, the full fp32 logits (b, v)) where a bound is not finite or the candidates are
    too many to pay."""
    xb = x.to(torch.bfloat16)
    a = kernels.linear(xb, screen).float()  # (b, v); fp32 here: torch's bf16 reductions are slow on CPU
    high, low = a.amax(dim=-1), a.amin(dim=-1)  # (b,) each
    x32 = x.float()  # a bf16 model's row: the bound and the recheck in fp32
    bound = screen_bound(x32, xb, torch.maximum(high.abs(), low.abs()), norms)
    if not bool(torch.isfinite(bound).all()):
        return None, None, kernels.linear(x, w).float()
    rows, cols = (a >= (high - 2 * bound)[:, None]).nonzero(as_tuple=True)  # (n,) each
    if rows.numel() > MAX_CANDIDATES_PER_ROW * x.shape[0]:
        return None, None, kernels.linear(x, w).float()  # near-flat logits: the recheck would cost more
    return rows, cols, (x32[rows] * w[cols].float()).sum(dim=-1)


def screen_bound(x: Tensor, xb: Tensor, a_max: Tensor, norms: Tensor) -> Tensor:
    """(b,): the most any screened logit of a row (bf16 x rounded to xb, whose largest |logit|
    is a_max) can differ from its fp32 recomputation; the module docstring derives it."""
    k = x.shape[-1]
    xb32 = xb.float()
    w_max, dw_max, wb_max = norms.unbind()
    x_n, xb_n, dx_n = x.norm(dim=-1), xb32.norm(dim=-1), (x - xb32).norm(dim=-1)
    return (dx_n * w_max + xb_n * dw_max + k * _U32 * xb_n * wb_max + (k + 1) * _U32 * x_n * w_max
            + 2.0 ** -6 * a_max + 2.0 ** -20)
