"""PickBuffer: the packed picks equal a fresh gather after any sequence of selections, and
only the new picks are copied in."""
from __future__ import annotations

import pytest
import torch

from runner.model.config import get_preset
from runner.kv.cache import KVCache
from runner.kv.picks import PickBuffer
from runner.kv.quant import QuantizedKVCache

CFG = get_preset("smollm2-135m").replace(num_layers=2)  # kvh 3, head_dim 64
B, N = 3, 200


def _cache(bits: int):
    g = torch.Generator().manual_seed(0)
    cache = (KVCache(CFG, B, N, torch.float32, "cpu") if bits == 16 else
             QuantizedKVCache(CFG, B, N, torch.float32, "cpu", bits=bits, group_size=32))
    for layer in range(CFG.num_layers):
        k, v = (torch.randn(B, CFG.num_kv_heads, N, CFG.head_dim, generator=g) for _ in range(2))
        cache.write(layer, k, v, 0)
    return cache


def _picks_sequence(groups: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Per-row pick sets (b, g, m) that drift: each step swaps 0-3 picks and sometimes grows."""
    g = torch.Generator().manual_seed(seed)
    m = 40
    sets = [torch.randperm(150, generator=g)[:m] for _ in range(B * groups)]
    out = []
    for step in range(steps):
        grow = step % 4 == 3
        for i, s in enumerate(sets):
            outside = torch.tensor([p for p in range(150) if p not in set(s.tolist())])
            swap = int(torch.randint(0, 4, (1,), generator=g))
            new = outside[torch.randperm(len(outside), generator=g)[:swap + grow]]
            keep = s[torch.randperm(m, generator=g)[:m - swap]]
            sets[i] = torch.cat((keep, new))
        m += grow
        out.append(torch.stack(sets).view(B, groups, m))
    return out


def _sorted_by_pos(k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    order = pos.sort(dim=-1).indices  # (b, g, m)
    return k.gather(2, order.unsqueeze(-1).expand(B, k.shape[1], -1, k.shape[3]))


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("groups", [1, CFG.num_kv_heads])
def test_packed_picks_equal_a_fresh_gather(bits, groups):
    cache, buf = _cache(bits), PickBuffer()
    changes = 0
    seq = _picks_sequence(groups, 12, seed=groups)
    for step, picks in enumerate(seq):
        before = buf.copied
        k, v, pos = buf.update(cache, 1, picks, 150)
        assert torch.equal(pos.sort(dim=-1).values, picks.sort(dim=-1).values)
        want_k, want_v = cache.gather(1, picks.sort(dim=-1).values)
        order_pos = pos if groups > 1 else pos.expand(B, CFG.num_kv_heads, -1)
        assert torch.equal(_sorted_by_pos(k, order_pos), want_k)
        assert torch.equal(_sorted_by_pos(v, order_pos), want_v)
        if step:  # only the picks not held last step were copied
            prev = seq[step - 1]
            new = sum(len(set(picks[r, g].tolist()) - set(prev[r, g].tolist())) for r in range(B) for g in range(groups))
            assert buf.copied - before == new
            changes += new
    assert 0 < changes < 0.2 * sum(p.numel() for p in seq[1:])


def test_rebuilds_when_the_set_shrinks_or_mostly_changes():
    cache, buf = _cache(16), PickBuffer()
    a = torch.arange(0, 60).view(1, 1, 60).expand(B, 1, 60).contiguous()
    buf.update(cache, 0, a, 150)
    for picks in (a[..., :50], a + 70):  # fewer picks; then all new
        before = buf.copied
        k, _, pos = buf.update(cache, 0, picks, 150)
        assert buf.copied - before == picks.numel()
        assert torch.equal(pos, picks)
        assert torch.equal(k, cache.gather(0, picks)[0])


@pytest.mark.parametrize("bits", [16, 8])
def test_a_buffer_holding_the_recent_run_copies_only_the_newest_token_and_new_picks(bits):
    cache, buf, recent = _cache(bits), PickBuffer(), 10
    seq = _picks_sequence(1, 12, seed=5)  # picks < 150; the recent run slides over 150..
    for step, picks in enumerate(seq):
        n = 160 + step
        before = buf.copied
        k, v, pos = buf.update(cache, 0, picks, n, recent)
        held = torch.cat((picks, torch.arange(n - recent, n).expand(B, 1, -1)), dim=-1).sort(dim=-1).values
        assert torch.equal(pos.sort(dim=-1).values, held)
        want_k, want_v = cache.gather(0, held)
        order_pos = pos.expand(B, CFG.num_kv_heads, -1)
        assert torch.equal(_sorted_by_pos(k, order_pos), want_k)
        assert torch.equal(_sorted_by_pos(v, order_pos), want_v)
        if step:  # per row: the picks not held last step, plus the token that just arrived
            prev = seq[step - 1]
            new = sum(len(set(picks[r, 0].tolist()) - set(prev[r, 0].tolist())) for r in range(B))
            assert buf.copied - before == new + B
