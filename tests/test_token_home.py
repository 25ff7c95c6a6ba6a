"""Phase III frees host memory: the token-tiered cache's cpu home is a ring holding only the tokens
cpu-resident at once (`TokenPhases.cpu_span`), not a row per position. Its reads still return
exactly the K/V written, scheduled runs still give the plain path's tokens, and the cpu pool's peak is
the memory plan's cpu bytes, smaller than the all-positions home by what the phases predict."""
from __future__ import annotations

import math

import pytest
import torch

from runner.memory.copy_engine import CopyEngine
from runner.memory.tiers import Memory, Tier, TierBudgets
from runner.offload.executor import OffloadPolicy
from runner.offload.phases import TokenPhases
from runner.offload.policy import KVPlacement
from runner.offload.sizing import KVSizing
from runner.offload.token_kv import TokenTieredKV, home_parts, tiered_bytes
from test_executor import CONFIGS, PROMPTS, _assert_same, _weights, offloaded, plain
from test_kv_placement import KVS, RECOMPUTE_ATOL

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama() -> tuple:
    """test_executor's tiny LLaMA (GQA: 2 kv heads of 16) and its random weights."""
    return CONFIGS["llama"], _weights(CONFIGS["llama"])

# Prompt of 32, grown to 64 one token at a time. At length n the cpu holds positions
# recompute_below(n)..gpu_from(n) = int(n / 2)..int(3n / 4) // 4 * 4: at most 16 at once (at n = 64:
# 32..48; n = 59 comes next with 29..44), so the ring has 16 slots where the old home had 64.
# Phase III's share of the saving is the 32 positions below recompute_below(64), which phase II alone
# (recompute_ratio 0) keeps in a home of 48; the other 16 are the recent tokens that never leave the gpu.
WIDTH, MAX_LEN, B = 32, 64, 2
PHASE3 = TokenPhases(p1=8, p2=16, offload_ratio=0.75, recompute_ratio=0.5, chunk=4)
PHASE2 = TokenPhases(p1=8, p2=16, offload_ratio=0.75, recompute_ratio=0.0, chunk=4)


def _grow(cfg, phases: TokenPhases, bits: int) -> tuple[int, int, int]:
    """Write random K/V of every layer from the prompt up to MAX_LEN, fetching ahead like the executor and
    reading the cpu-resident and recent run back after each step (it must be what was written). Returns
    (the cpu pool's peak, tiered_bytes' cpu bytes, bytes moved down to cpu)."""
    kvh, d, layers = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(B, kvh, MAX_LEN, d, generator=gen) for _ in range(2))  # (b, kvh, n, d)
    atol = 0 if bits == 16 else 0.02  # INT8 groups of the head dim: half a quantization step of randn values
    memory = Memory(TierBudgets(offload_dir="unused"))
    with CopyEngine(memory, threads=2) as engine:  # two threads: ring slots are reused while copies may run
        cache = TokenTieredKV(cfg, B, MAX_LEN, torch.float32, phases=phases, memory=memory, engine=engine,
                              bits=bits, group_size=d, min_len=WIDTH)
        for j in range(layers):
            cache.write(j, k[:, :, :WIDTH], v[:, :, :WIDTH], 0)
        for n in range(WIDTH + 1, MAX_LEN + 1):
            rec = phases.recompute_below(n)
            for j in range(layers):
                cache.fetch_ahead(j, n, max(rec, n - 8))
                cache.write(j, k[:, :, n - 1:n], v[:, :, n - 1:n], n - 1)
                got_k, got_v = cache.read(j, n, rec)  # the cpu part comes from the ring (and the fetch ahead)
                torch.testing.assert_close(got_k, k[:, :, rec:n], rtol=0, atol=atol)
                torch.testing.assert_close(got_v, v[:, :, rec:n], rtol=0, atol=atol)
                cache.drop_ahead(j)
        assert cache.traffic.recomputed == 0 and cache.traffic.up_bytes > 0
        planned = tiered_bytes(cfg, B, MAX_LEN, torch.float32, phases, bits, d, min_len=WIDTH)[1]
        out = memory.cpu.peak, planned, cache.traffic.down_bytes
        cache.free()
    assert memory.cpu.in_use == 0
    return out


@pytest.mark.parametrize("bits", [16, 8])
def test_phase3_ring_home_holds_only_live_tokens(llama, bits):
    cfg = llama[0]
    parts = home_parts(cfg, B, 1, torch.float32, bits, cfg.head_dim)  # one ring slot of one layer's K (or V)
    home = 2 * cfg.num_layers * sum(math.prod(s) * dt.itemsize for s, dt in parts)  # a slot, all layers, K and V
    assert PHASE3.cpu_span(MAX_LEN, WIDTH) == 16 and PHASE2.cpu_span(MAX_LEN, WIDTH) == 48
    peak3, planned3, down3 = _grow(cfg, PHASE3, bits)
    peak2, planned2, down2 = _grow(cfg, PHASE2, bits)
    assert peak3 == planned3 == 16 * home  # the pool's peak is the plan's cpu bytes
    assert peak2 == planned2 == 48 * home
    assert 64 * home - peak3 == 48 * home  # the all-positions home of before: 64 slots
    assert peak2 - peak3 == PHASE3.recompute_below(MAX_LEN) * home == 32 * home  # what phase III frees
    # Moved down: each position that is ever cpu-resident, once; phase III drops some as they leave the gpu.
    ever = set().union(*(range(PHASE3.recompute_below(n), PHASE3.gpu_from(n)) for n in range(WIDTH, MAX_LEN + 1)))
    assert down3 == len(ever) * home < down2


# Phase III from the prompt on; at length 54 the gpu window moves from 16 to 32 and recompute_below
# jumps to 27, so 16..26 are dropped as they leave the gpu and 27..31 wrap round a ring of 5 slots
# (position 15, offloaded by the prompt, holds one): the home keeps 5 of 70 positions.
LONG = OffloadPolicy(kv_placement=KVPlacement.TOKEN, p1=8, p2=16, offload_ratio=0.6, recompute_ratio=0.5)
LONG_STEPS = 40


@pytest.mark.parametrize("kv", ["dense", "swa0.8"])
def test_scheduled_phase3_run_with_a_ring_home_matches_plain_and_its_plan(llama, tmp_path, kv):
    """The plain path's tokens (logits within RECOMPUTE_ATOL, see test_kv_placement), and the cpu pool's
    peak is exactly the memory plan's cpu bytes (the KV homes are the cpu tier's only allocations)."""
    cfg, weights = llama
    gbs = 4
    ref = plain(cfg, weights, PROMPTS, gbs, LONG_STEPS, KVS[kv])
    logits, tokens, stats = offloaded(cfg, weights, PROMPTS, LONG, TierBudgets(offload_dir=str(tmp_path)),
                                      gbs, 2, LONG_STEPS, KVS[kv])
    _assert_same(ref, (logits, tokens), RECOMPUTE_ATOL)
    assert stats["recomputed_tokens"] > 0 and stats["kv_bytes_gpu_from_cpu"] > 0
    shapes = [(gbs, max(map(len, PROMPTS[r:r + gbs])) + LONG_STEPS) for r in range(0, len(PROMPTS), gbs)]
    assert shapes == [(4, 70), (4, 68)]
    phases = TokenPhases.of(LONG)
    assert [phases.cpu_span(n, n - LONG_STEPS) for _, n in shapes] == [5, 5]
    planned = KVSizing(cfg=cfg, policy=LONG, kv=KVS[kv], dtype=torch.float32).plan(shapes, LONG_STEPS)[Tier.CPU]
    assert stats["peak_cpu_pool_bytes"] == sum(planned.values())
    slot = 2 * cfg.num_layers * gbs * cfg.num_kv_heads * cfg.head_dim * 4  # K and V of one position, float32
    assert stats["peak_cpu_pool_bytes"] == 2 * 5 * slot  # two GPU batches' rings; before: (70 + 68) * slot
