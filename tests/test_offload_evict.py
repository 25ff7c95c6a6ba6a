"""kv.mode: evict in the block executor, under FlexGen's per-sequence split: the policy's unselected tokens
are freed for good on every tier (the working slot and the gpu, cpu and disk homes are compacted alike),
each GPU batch's cache holds budget + 1 slots, and the memory plan counts exactly that.

Tolerance: an evict step attends over the same compacted slots, in the same (age) order, on both paths:
the plain cache's and the executor's working slot hold the same values, so no sum is reordered (unlike
retain's split of picks and recent run, SPARSE_ATOL). Logits are bit-identical here; TINY_ATOL only leaves
room for BLAS kernels that round differently at other addresses (see tests/test_executor.py). A home that
missed a compaction (a stale or shifted slot) moves logits by O(1) and the greedy tokens with them.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from policies import get_policy
from runner.kv.spec import KVMode, KVSettings
from runner.kv.store import kv_capacity
from runner.memory.tiers import BudgetError, Tier, TierBudgets
from runner.offload.executor import OffloadPolicy
from runner.offload.policy import KVPlacement
from runner.offload.sequence_kv import slots_bytes, split_rows
from runner.offload.sizing import KVSizing, block_need, weight_need
from test_executor import CONFIGS, PROMPTS, STEPS, TINY_ATOL, _assert_same, _weights, offloaded, plain

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVICT = {name: KVSettings(policy=get_policy(name, sparsity=0.5), mode=KVMode.EVICT) for name in ("h2o", "swa")}
SPLITS = {"seq-cpu": dict(cache_gpu_percent=0, cache_cpu_percent=100),
          "seq-mixed": dict(cache_gpu_percent=25, cache_cpu_percent=50)}  # and 25% on disk
WEIGHTS_SPLIT = dict(w_gpu_percent=30, w_cpu_percent=50)  # and 20% on disk


@pytest.fixture(scope="module")
def llama() -> tuple:
    """test_executor's tiny LLaMA (GQA: 2 kv heads of 16) and its random weights."""
    return CONFIGS["llama"], _weights(CONFIGS["llama"])


def _shapes(gbs: int, steps: int = STEPS) -> list[tuple[int, int]]:
    """(rows, max_len) of each GPU batch of PROMPTS, as the executor plans them."""
    return [(gbs, max(map(len, PROMPTS[r:r + gbs])) + steps) for r in range(0, len(PROMPTS), gbs)]


def _planned(cfg, policy: OffloadPolicy, kv: KVSettings, gbs: int) -> dict[Tier, int]:
    """The executor's whole plan per tier: weights, staging, rotary tables, KV and activations."""
    weights, _ = weight_need(cfg, policy, torch.float32)
    sizing = KVSizing(cfg=cfg, policy=policy, kv=kv, dtype=torch.float32)
    block = block_need(cfg, sizing, policy.act_tier, _shapes(gbs), STEPS, torch.float32)
    return {t: sum(weights[t].values()) + sum(block[t].values()) for t in Tier}


def _peaks(stats: dict) -> dict[Tier, int]:
    return {Tier.GPU: stats["peak_gpu_pool_bytes"], Tier.CPU: stats["peak_cpu_pool_bytes"],
            Tier.DISK: stats["peak_disk_bytes"]}


@pytest.mark.parametrize("name, split, ngb, overlap", [
    ("h2o", "seq-mixed", 1, True), ("h2o", "seq-mixed", 4, True), ("swa", "seq-mixed", 4, False),
    ("swa", "seq-cpu", 1, True),
])
def test_offloaded_evict_run_matches_the_plain_evict_run_and_its_plan(llama, tmp_path, name, split, ngb, overlap):
    """Weights and KV across gpu, cpu and disk: the plain all-resident evict run's tokens and logits, and
    every pool's peak is exactly the plan's bytes for its tier."""
    cfg, weights = llama
    gbs, kv = len(PROMPTS) // ngb, EVICT[name]
    policy = OffloadPolicy(**SPLITS[split], **WEIGHTS_SPLIT, overlap=overlap)
    ref = plain(cfg, weights, PROMPTS, gbs, STEPS, kv)
    logits, tokens, stats = offloaded(cfg, weights, PROMPTS, policy, TierBudgets(offload_dir=str(tmp_path)),
                                      gbs, ngb, STEPS, kv)
    _assert_same(ref, (logits, tokens), TINY_ATOL)
    assert stats["kv_bytes_gpu_from_cpu"] > 0 and stats["kv_bytes_cpu_from_gpu"] > 0
    assert _peaks(stats) == _planned(cfg, policy, kv, gbs)
    # Prompts of 9..30 tokens grow to 19..40 with budgets of 10..20 at sparsity 0.5: every run evicts.
    assert all(kv_capacity(kv, n) < n for _, n in _shapes(gbs))


def test_evict_plan_is_smaller_than_retain_by_the_budget_and_fits_where_retain_does_not(llama, tmp_path):
    """Per tier, the evict plan is the retain plan less (n - (budget + 1)) token slots of every row homed
    there (and of the gpu working slots), and less retain's pick buffers; budgets set to the evict plan run
    it (the plain path's tokens, pools within them) and refuse the retain run up front, naming its KV."""
    cfg, weights = llama
    gbs, ngb = 4, 2
    kv = EVICT["h2o"]
    retain = dataclasses.replace(kv, mode=KVMode.RETAIN)
    policy = OffloadPolicy(**SPLITS["seq-mixed"])  # weights on the gpu: the cpu and disk tiers hold only KV
    shapes = _shapes(gbs)
    plans = {mode: KVSizing(cfg=cfg, policy=policy, kv=s, dtype=torch.float32).plan(shapes, STEPS)
             for mode, s in (("evict", kv), ("retain", retain))}
    token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # K and V of one slot, all layers, fp32
    rows = dict(zip((Tier.GPU, Tier.CPU, Tier.DISK), split_rows(gbs, 25, 50)))
    assert all(rows.values())  # every tier holds some rows
    for tier in Tier:
        freed = sum(rows[tier] * (n - kv_capacity(kv, n)) * token for _, n in shapes)
        if tier is Tier.GPU:
            (b, kvh, n, d), cap = (gbs, cfg.num_kv_heads, max(n for _, n in shapes), cfg.head_dim), \
                max(kv_capacity(kv, n) for _, n in shapes)
            freed += slots_bytes((b, kvh, n, d), torch.float32) - slots_bytes((b, kvh, cap, d), torch.float32)
            picks = [v for part, v in plans["retain"][tier].items() if part.startswith("SWA picks")]
            assert all(picks) and all(v == 0 for part, v in plans["evict"][tier].items()
                                      if part.startswith("SWA picks"))
            freed += sum(picks)
        assert sum(plans["retain"][tier].values()) - sum(plans["evict"][tier].values()) == freed > 0
    planned = _planned(cfg, policy, kv, gbs)
    tight = TierBudgets(gpu_bytes=planned[Tier.GPU], cpu_bytes=planned[Tier.CPU], disk_bytes=planned[Tier.DISK],
                        offload_dir=str(tmp_path))
    ref = plain(cfg, weights, PROMPTS, gbs, STEPS, kv)
    logits, tokens, stats = offloaded(cfg, weights, PROMPTS, policy, tight, gbs, ngb, STEPS, kv)
    _assert_same(ref, (logits, tokens), TINY_ATOL)
    assert _peaks(stats) == planned
    with pytest.raises(BudgetError, match=r"^gpu: plan \(.*KV"):
        offloaded(cfg, weights, PROMPTS, policy, tight, gbs, ngb, STEPS, retain)


def test_compressed_split_evict_equals_the_plain_4bit_evict_cache(llama, tmp_path):
    """compress_cache stores 4-bit groups on every tier; evict compacts the codes, scales and minimums of
    each home alike: exactly the plain kv.bits 4 evict cache (groups of the head dim, 16 here)."""
    cfg, weights = llama
    kv = EVICT["h2o"]
    policy = OffloadPolicy(**SPLITS["seq-mixed"], compress_cache=True)
    ref = plain(cfg, weights, PROMPTS, 4, STEPS, dataclasses.replace(kv, bits=4, group_size=cfg.head_dim))
    logits, tokens, _ = offloaded(cfg, weights, PROMPTS, policy, TierBudgets(offload_dir=str(tmp_path)), 4, 2,
                                  STEPS, kv)
    _assert_same(ref, (logits, tokens), TINY_ATOL)


@pytest.mark.parametrize("fields, kv, message", [
    (dict(kv_placement=KVPlacement.TOKEN, p1=8, p2=16, offload_ratio=0.6), EVICT["swa"],
     r"^kv\.mode: evict .*kv_placement: token"),
    (dict(cache_gpu_percent=0, cache_cpu_percent=100, cpu_cache_compute=True),
     KVSettings(mode=KVMode.EVICT), r"^offload\.cpu_cache_compute: .*kv\.mode: retain"),
])
def test_evict_is_refused_where_slots_cannot_be_compacted(llama, fields, kv, message):
    with pytest.raises(ValueError, match=message) as e:
        KVSizing(cfg=llama[0], policy=OffloadPolicy(**fields), kv=kv, dtype=torch.float32)
    assert "\n" not in str(e.value)
