"""plan_need (the plan search's per-tier totals) equals the executor's own itemised block plan summed,
for every KV placement and activation tier, with one and several GPU batches."""
from __future__ import annotations

import pytest
import torch

from policies import get_policy
from runner.model.config import get_preset
from runner.offload.placement import KVPlacer
from runner.kv.spec import KVSettings
from runner.memory.tiers import Tier
from runner.offload.policy import KVPlacement, OffloadPolicy
from runner.offload.sizing import block_need, plan_need, weight_need

POLICIES = {
    "plain": OffloadPolicy(w_gpu_percent=50, w_cpu_percent=50),
    "split": OffloadPolicy(cache_gpu_percent=30, cache_cpu_percent=50),
    "split-4bit": OffloadPolicy(cache_gpu_percent=60, cache_cpu_percent=40, compress_cache=True),
    "token": OffloadPolicy(kv_placement=KVPlacement.TOKEN, p1=64, p2=160, offload_ratio=0.8, recompute_ratio=0.1),
    "token-gathered": OffloadPolicy(kv_placement=KVPlacement.TOKEN, p1=64, p2=200, offload_ratio=0.9,
                                    pick_buffer=False),
}
ACTS = {"gpu": {}, "cpu": dict(act_gpu_percent=0, act_cpu_percent=100), "disk": dict(act_gpu_percent=0, act_cpu_percent=0)}


@pytest.mark.parametrize("placement", POLICIES)
@pytest.mark.parametrize("acts", ACTS)
@pytest.mark.parametrize("k", [1, 3])
def test_plan_need_is_the_block_plan_summed(placement, acts, k):
    cfg = get_preset("opt-125m")
    kv = KVSettings(policy=get_policy("swa", sparsity=0.8), bits=8 if placement.startswith("token") else 16)
    if placement == "plain":
        kv = KVSettings()
    policy = OffloadPolicy(**{**POLICIES[placement].to_dict(), **ACTS[acts]})
    dtype, b, prompt, gen = torch.float16, 4, 128, 96
    got = plan_need(cfg, policy, kv, dtype, gpu_batch_size=b, num_gpu_batches=k, prompt_len=prompt, gen_len=gen)
    placer = KVPlacer(cfg, policy, kv, None, None, dtype)
    block = block_need(cfg, placer, policy.act_tier, [(b, prompt + gen)] * k, gen, dtype)
    weights, _ = weight_need(cfg, policy, dtype)
    assert got == {t: sum(weights[t].values()) + sum(block[t].values()) for t in Tier}
    assert got[Tier.GPU] > 0
