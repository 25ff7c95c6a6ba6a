"""The model math: pure functions over explicit weight tensors, no device logic.

Every function takes tensors already on the compute device. Shapes use
b = batch, s = new tokens this call, t = keys attended, h = hidden, nh / kvh = query / kv
heads, g = nh // kvh (GQA group), d = head dim, f = MLP width, v = vocab.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from runner.model import kernels
def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    # One kernel instead of a chain of elementwise ops: decode's small rows are op-overhead bound.
    return kernels.rms_norm(x, w, eps)


def layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def rope_tables(head_dim: int, max_len: int, theta: float, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """cos and signed sin, each (max_len, d), in HF's rotate-half layout (halves, not interleaved).

    The sin table's first half is negated, so rotate_half(x) * sin = roll(x, d/2) * signed_sin:
    `apply_rope` then needs no negation or concatenation (the same products; addcmul may round
    the final sum differently, by about an ulp).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    pos = torch.arange(max_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # (max_len, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, d)
    sin = emb.sin()
    sin[:, :head_dim // 2].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x: (b, heads, s, d); cos/signed_sin: (b, 1, s, d) gathered at each token's position
    (from `rope_tables`). x * cos + rotate_half(x) * sin: natively in one pass where the kernel takes
    the tensors, else in three ops."""
    out = kernels.rope(x, cos, signed_sin)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin) if out is None else out


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)  # (b, heads, s, d)


def merge_heads(x: Tensor) -> Tensor:
    b, heads, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, heads * d)  # (b, s, h)


def attention_prefill(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Causal attention over the prompt. q: (b, nh, s, d); k, v: (b, kvh, s, d).

    mask: None for unpadded batches (fast causal path), else bool (b, 1, s, s), True = attend.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        # Expanding K/V is cheaper here than SDPA's enable_gqa, which drops to the
        # O(s^2)-memory math kernel on CPU.
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_decode(q: Tensor, k: Tensor | list[Tensor], v: Tensor | list[Tensor],
                     bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """One new query per sequence against t cached keys, with explicit probabilities.

    q: (b, nh, 1, d); k, v: (b, kvh, t, d), or lists of such parts whose t's add up (a
    sparse selection as gathered picks + the recent run read in place: no concatenation);
    bias: additive, broadcastable to (b, kvh, 1, t), or None.
    Returns (out (b, nh, 1, d), probs (b, nh, t)). The probabilities are what the
    sparse-KV policies score tokens by, so they are computed explicitly (one unbiased part runs in one
    native call, `kernels.decode_attend`, with the same results as the three steps).
    """
    ks, vs = (k, v) if isinstance(k, list) else ([k], [v])
    b, nh, _, d = q.shape
    kvh = ks[0].shape[1]
    qg = q.view(b, kvh, nh // kvh, d)  # (b, kvh, g, d): GQA without copying K/V
    fused = kernels.decode_attend(qg, ks[0], vs[0], 1.0 / math.sqrt(d)) if bias is None and len(ks) == 1 else None
    if fused is not None:
        out, probs = fused  # (b, kvh, g, d), (b, kvh, g, t)
        return out.view(b, nh, 1, d).to(q.dtype), probs.view(b, nh, -1)
    scores = kernels.decode_scores(qg, ks, 1.0 / math.sqrt(d))  # (b, kvh, g, t)
    if bias is not None:
        scores = scores + bias
    probs = kernels.decode_softmax(scores)  # (b, kvh, g, t); fp32 where the kernels widen a bf16 cache
    out = kernels.decode_values(probs, vs)  # (b, kvh, g, d)
    return out.view(b, nh, 1, d).to(q.dtype), probs.view(b, nh, -1)


def attention_column_sums(q: Tensor, k: Tensor, q_start: int, mask: Tensor | None, weights: Tensor,
                          chunk: int) -> Tensor:
    """Weighted column sums of causal softmax(QK^T / sqrt(d)): how much attention each key gets
    from the given queries, summed over each kv head's group (the prompt scores of H2O / SWA).

    q: (b, nh, sq, d), the queries at positions q_start..q_start+sq; k: (b, kvh, t, d);
    mask: bool (b, 1, sq, t), True = attend (causal too: no query attends past itself), or None
    for plain causal; weights: (sq,) per query;
    chunk: queries per tile, so at most (b, nh, chunk, t) fp32 scores exist at once.
    Returns fp32 (b, kvh, t): sum over query i and group head of weights[i] * probs[head, i, :].
    Only the given queries' rows are ever computed, and each tile only up to its last query's
    key (later keys are in every row's future): O(sq * t) work, no (t, t) matrix.
    """
    b, nh, sq, d = q.shape
    kvh, t = k.shape[1], k.shape[2]
    g = nh // kvh
    kf = k.to(torch.float32).reshape(b * kvh, t, d)  # (b*kvh, t, d): fp32 scores whatever the model dtype
    w = weights.to(torch.float32)
    total = torch.zeros((b * kvh, 1, t), dtype=torch.float32, device=q.device)  # (b*kvh, 1, t)
    for i in range(0, sq, chunk):
        j = min(sq, i + chunk)
        c, last = j - i, q_start + j  # keys 0..last can be attended by this tile's queries
        # The scale goes on the (c, d) queries, not the (c, t) scores; rows ordered (group head, query).
        qs = q[:, :, i:j].to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        qs = qs.mul_(1.0 / math.sqrt(d)).view(b * kvh, g * c, d)  # (b*kvh, g*c, d)
        scores = torch.bmm(qs, kf[:, :last].transpose(1, 2)).view(b, kvh, g, c, last)  # fp32 logits
        if mask is not None:  # padding breaks the causal pattern: the mask covers the whole tile
            scores.masked_fill_(~mask[:, :, i:j, :last].unsqueeze(1), float("-inf"))
        elif c > 1:  # only the last c - 1 keys can be in some query's future: mask that corner alone
            future = torch.ones((c, c - 1), dtype=torch.bool, device=q.device).triu_()  # key > query
            scores[..., last - c + 1:].masked_fill_(future, float("-inf"))
        # Softmax in place, its 1/rowsum folded into the query weights: no second tile, no division pass.
        scores.sub_(scores.amax(-1, keepdim=True)).exp_()
        scores = scores.view(b * kvh, g * c, last)  # unnormalised probabilities
        row_w = w[i:j].repeat(g) / scores.sum(-1)  # (b*kvh, g*c)
        total[..., :last].baddbmm_(row_w.unsqueeze(1), scores)  # sum over queries and the group: one matmul
    return total.view(b, kvh, t)


def swiglu_mlp(x: Tensor, gate_up_w: Tensor, down_w: Tensor, residual: Tensor | None = None) -> Tensor:
    """down(silu(gate(x)) * up(x)) (+ residual (b, s, h)): x (b, s, h) -> (b, s, h)."""
    return kernels.linear(kernels.swiglu(x, gate_up_w), down_w, residual=residual)  # (b, s, f) in between


def relu_mlp(x: Tensor, fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor,
             residual: Tensor | None = None) -> Tensor:
    """fc2(relu(fc1(x))) (+ residual): x (b, s, h) -> (b, s, h)."""
    return kernels.linear(kernels.linear(x, fc1_w, fc1_b).relu_(), fc2_w, fc2_b, residual=residual)


def lm_head(x: Tensor, w: Tensor) -> Tensor:
    """x: (b, e), w: (v, e) -> logits (b, v)."""
    return kernels.linear(x, w)
