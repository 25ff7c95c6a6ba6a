"""runner.model.ops' prompt scoring (`attention_column_sums`) against the slow, obviously
correct formula: the whole (s, s) softmax matrix in float64, masked, weighted, summed.

Tolerance: the function computes in fp32 (whatever the input dtype); sums of positive terms
keep its relative error at a few 1e-7, so rtol 1e-5 leaves headroom while a wrong mask,
group, weight or scale moves scores by far more.
"""
from __future__ import annotations

import math

import pytest
import torch

from policies import get_policy
from runner.kv.scores import ScoreState
from runner.model import ops as M


def padded_mask(valid: torch.Tensor) -> torch.Tensor:
    """The prefill mask of runner.engines.lm for left-padded rows: causal over real keys, and a
    padding query attends to itself alone. valid: (b, s) -> (b, 1, s, s), True = attend."""
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return (causal & valid[:, None, None, :]) | torch.eye(s, dtype=torch.bool)


def reference(q: torch.Tensor, k: torch.Tensor, first: int, mask: torch.Tensor | None,
              weights: torch.Tensor) -> torch.Tensor:
    """float64 (b, kvh, s): the full softmax of every query row, then the weighted sum of rows
    first.. and of the heads of each kv head's group. q: (b, nh, s, d); k: (b, kvh, s, d)."""
    b, nh, s, d = q.shape
    kvh = k.shape[1]
    q, k = q.double(), k.double().repeat_interleave(nh // kvh, dim=1)  # (b, nh, s, d)
    allowed = torch.ones(s, s, dtype=torch.bool).tril() if mask is None else mask  # (b|1, 1|.., s, s)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (b, nh, s, s)
    rows = (probs[:, :, first:] * weights.double()[:, None]).sum(2)  # (b, nh, s)
    return rows.view(b, kvh, nh // kvh, s).sum(2)


def _weights(policy: str, s: int, window: int) -> tuple[int, torch.Tensor]:
    """(first scored query, weights) as the policy's ScoreState asks for them."""
    params = {"h2o": {}, "swa": {"window": window}, "swa-decay": {"window": window, "score": "decay"}}[policy]
    p = get_policy(policy.split("-")[0], budget_tokens=8, **params)
    state = ScoreState(p.scoring, 1, 1, s, torch.float32, torch.device("cpu"), False)
    return state.prompt_weights(s, p.score_window(s))


def _inputs(b: int, nh: int, kvh: int, s: int, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Scaled up so softmax rows are peaked (small probabilities matter to the relative check).
    return 2 * torch.randn(b, nh, s, d, generator=gen), 2 * torch.randn(b, kvh, s, d, generator=gen)


@pytest.mark.parametrize("policy", ["swa", "swa-decay", "h2o"])
@pytest.mark.parametrize("nh,kvh", [(4, 4), (6, 2)])  # MHA, GQA groups of 3
@pytest.mark.parametrize("window", [5, 37])  # fewer than s, and all of it
@pytest.mark.parametrize("chunk", [1, 4, 64])  # a query per tile, tiles not dividing s, one tile
@pytest.mark.parametrize("padded", [False, True])
def test_column_sums_match_the_full_softmax(policy, nh, kvh, window, chunk, padded):
    s = 37
    q, k = _inputs(2, nh, kvh, s)
    first, weights = _weights(policy, s, window)
    mask = None
    if padded:
        valid = torch.ones(2, s, dtype=torch.bool)
        valid[1, :7] = False  # row 1 left-padded by 7: its padding queries count for h2o too
        mask = padded_mask(valid)
    got = M.attention_column_sums(q[:, :, first:], k, first, None if mask is None else mask[:, :, first:],
                                  weights, chunk)
    assert got.dtype == torch.float32 and got.shape == (2, kvh, s)
    torch.testing.assert_close(got.double(), reference(q, k, first, mask, weights), rtol=1e-5, atol=1e-9)


def test_column_sums_of_half_precision_inputs_are_computed_in_fp32():
    # bf16 scores would miss the reference (of the same bf16 values) by ~1e-2 relative.
    q, k = _inputs(1, 4, 2, 50)
    q, k = q.bfloat16(), k.bfloat16()
    weights = torch.ones(20, dtype=torch.bfloat16)
    got = M.attention_column_sums(q[:, :, 30:], k, 30, None, weights, chunk=7)
    torch.testing.assert_close(got.double(), reference(q, k, 30, None, weights), rtol=1e-5, atol=1e-9)


def test_column_sums_follow_the_layout_of_split_heads():
    # q / k as the model makes them: transposed views of (b, s, heads, d), not contiguous.
    q, k = _inputs(2, 4, 2, 21)
    qt, kt = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    weights = torch.linspace(0.5, 1.0, 9)
    got = M.attention_column_sums(qt[:, :, 12:], kt, 12, None, weights, chunk=4)
    torch.testing.assert_close(got.double(), reference(q, k, 12, None, weights), rtol=1e-5, atol=1e-9)
