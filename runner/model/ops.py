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
    (from `rope_tables`). x * cos + rotate_half(x) * sin in three ops."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


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
    sparse-KV policies score tokens by, so they are computed explicitly, not fused.
    """
    ks, vs = (k, v) if isinstance(k, list) else ([k], [v])
    b, nh, _, d = q.shape
    kvh = ks[0].shape[1]
    qg = q.view(b, kvh, nh // kvh, d)  # (b, kvh, g, d): GQA without copying K/V
    scores = kernels.decode_scores(qg, ks, 1.0 / math.sqrt(d))  # (b, kvh, g, t)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)  # (b, kvh, g, t)
    out = kernels.decode_values(probs, vs)  # (b, kvh, g, d)
    return out.view(b, nh, 1, d), probs.view(b, nh, -1)


def attention_probs(q: Tensor, k: Tensor, q_start: int, mask: Tensor | None) -> Tensor:
    """Explicit causal softmax(QK^T / sqrt(d)) for scoring a prompt's keys.

    q: (b, nh, sq, d), the queries at positions q_start..q_start+sq; k: (b, kvh, t, d);
    mask: bool (b, 1, sq, t), True = attend, or None for plain causal. Returns
    (b, kvh, g, sq, t), grouped by kv head (GQA).
    """
    b, nh, sq, d = q.shape
    kvh, t = k.shape[1], k.shape[2]
    g = nh // kvh
    qg = q.reshape(b, kvh, g * sq, d)  # (b, kvh, g*sq, d): one matmul per kv head, no broadcast copies
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(1.0 / math.sqrt(d)).view(b, kvh, g, sq, t)
    if mask is not None:
        scores.masked_fill_(~mask.unsqueeze(1), float("-inf"))
    else:  # only keys after the first query can be in the future: mask that tail alone
        keys = torch.arange(q_start + 1, t, device=q.device)
        queries = torch.arange(q_start, q_start + sq, device=q.device)
        scores[..., q_start + 1:].masked_fill_(keys > queries[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1)


def swiglu_mlp(x: Tensor, gate_up_w: Tensor, down_w: Tensor) -> Tensor:
    gate, up = kernels.linear(x, gate_up_w).chunk(2, dim=-1)  # (b, s, f) each
    return kernels.linear(F.silu(gate).mul_(up), down_w)  # in place: one (b, s, f) temporary fewer


def relu_mlp(x: Tensor, fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor, fc2_b: Tensor) -> Tensor:
    return kernels.linear(kernels.linear(x, fc1_w, fc1_b).relu_(), fc2_w, fc2_b)


def lm_head(x: Tensor, w: Tensor) -> Tensor:
    """x: (b, e), w: (v, e) -> logits (b, v)."""
    return kernels.linear(x, w)
