"""Plan search: plans fit every budget, are deterministic, keep everything on the gpu when it fits,
and come within 10% of the best plan of a brute-force grid under the same cost model."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from policies import get_policy
from runner.model.config import get_preset
from runner.plan.cost_model import Plan, Workload, peak_bytes, predict
from runner.plan.hardware import load_profile
from runner.kv.spec import KVSettings
from runner.memory.tiers import Tier
from runner.offload.policy import OffloadPolicy
from runner.plan.search import _Eval, budgets_from, flexgen_allows, search_alisa, search_flexgen

T4 = load_profile("t4-16g")
SWA8 = KVSettings(policy=get_policy("swa", sparsity=0.8), bits=8)


def _workload(model: str, prompt: int = 512, gen: int = 32, kv: KVSettings = KVSettings()) -> Workload:
    return Workload(cfg=get_preset(model), prompt_len=prompt, gen_len=gen, num_prompts=1, dtype=torch.float16, kv=kv)


def _fits(result, budgets) -> bool:
    need = peak_bytes(result.workload, result.plan)
    return all(need[t] <= budgets[t] for t in budgets)


@pytest.mark.parametrize("model", ["opt-6.7b", "opt-30b"])
@pytest.mark.parametrize("search", [search_flexgen, search_alisa], ids=["flexgen", "alisa"])
def test_searched_plans_fit_and_are_deterministic(model, search):
    budgets = budgets_from(T4)
    w = _workload(model, kv=SWA8)
    a, b = search(w, T4, budgets), search(w, T4, budgets)
    assert a is not None and a.plan == b.plan
    assert _fits(a, budgets)
    assert a.prediction.total_throughput > 0


def test_everything_stays_on_the_gpu_when_it_fits():
    budgets = budgets_from(T4)
    r = search_flexgen(_workload("opt-125m", prompt=128, gen=32), T4, budgets, gpu_batch_size=4, num_gpu_batches=1)
    policy = r.plan.offload
    assert (policy.w_gpu_percent, policy.cache_gpu_percent, policy.act_tier.value) == (100, 100, "gpu")


def test_impossible_budgets_give_no_plan():
    budgets = {Tier.GPU: 1e6, Tier.CPU: 1e6, Tier.DISK: 1e6}  # 1 MB per tier: not even one layer of opt-1.3b
    assert search_flexgen(_workload("opt-1.3b"), T4, budgets) is None
    assert search_alisa(_workload("opt-1.3b", kv=SWA8), T4, budgets) is None


def test_flexgen_search_is_within_10_percent_of_a_brute_force_grid():
    """OPT-6.7B on a T4 with 8 GiB usable: every (w, cache) split in 10-point steps, activations on the
    gpu, batch 8 x 1..4; the greedy plan predicts at least 90% of the grid's best."""
    w = _workload("opt-6.7b")
    budgets = budgets_from(T4, gpu_gib=8)
    best = 0.0
    for k, wg, wc, cg, cc in itertools.product((1, 2, 4), range(0, 101, 10), range(0, 101, 10), range(0, 101, 10),
                                               range(0, 101, 10)):
        if wg + wc > 100 or cg + cc > 100:
            continue
        plan = Plan(gpu_batch_size=8, num_gpu_batches=k, offload=OffloadPolicy(
            w_gpu_percent=wg, w_cpu_percent=wc, cache_gpu_percent=cg, cache_cpu_percent=cc))
        work = Workload(cfg=w.cfg, prompt_len=512, gen_len=32, num_prompts=8 * k, dtype=w.dtype)
        need = peak_bytes(work, plan)
        if all(need[t] <= budgets[t] for t in budgets):
            best = max(best, predict(work, plan, T4, samples=16).total_throughput)
    found = search_flexgen(w, T4, budgets, gpu_batch_size=8)
    assert found is not None and _fits(found, budgets)
    assert found.prediction.total_throughput >= 0.9 * best


def test_without_an_accelerator_gpu_and_cpu_tiers_share_one_ram():
    """cpu-only: the 'gpu' is the CPU, so a plan's gpu and cpu bytes together must fit the RAM once."""
    import dataclasses
    from runner.plan.hardware import TierMemory
    cpu_only = load_profile("cpu-only")
    hw = dataclasses.replace(cpu_only, memory_gib=TierMemory(gpu=4.0, cpu=4.0, disk=100.0), usable_fraction=1.0)
    w = Workload(cfg=get_preset("opt-1.3b"), prompt_len=128, gen_len=16, num_prompts=1, dtype=torch.float32)
    r = search_flexgen(w, hw, budgets_from(hw), gpu_batch_size=4, num_gpu_batches=1)
    assert r is not None  # 5.3 GB of weights: some must go to disk
    need = peak_bytes(r.workload, r.plan)
    assert need[Tier.GPU] + need[Tier.CPU] <= 4 * 2 ** 30 and need[Tier.DISK] > 0  # memory_gib: 4 GiB of RAM


def test_flexgen_compresses_its_cache_when_that_is_faster_whatever_the_jobs_own_kv():
    """OPT-30B, batch 64, 128/512 on an H100: 16-bit KV cannot sit beside the weights, 4-bit KV nearly can.
    The search covers FlexGen's whole policy space, so a dense 16-bit job's FlexGen plan stores its KV
    compressed (the old search tried compress_cache only for a job whose own KV was quantized), wholly on
    one tier, never with cpu_cache_compute (which attends over uncompressed KV), and predicts far more
    than the fastest uncompressed plan it beats."""
    h100 = load_profile("h100-80g")
    w = _workload("opt-30b", prompt=128, gen=512)
    budgets = budgets_from(h100)
    found = search_flexgen(w, h100, budgets, gpu_batch_size=64, num_gpu_batches=1)
    policy = found.plan.offload
    assert policy.compress_cache and not policy.cpu_cache_compute and flexgen_allows(policy)
    assert _fits(found, budgets)
    plain = _best_uncompressed(w, h100, budgets, gbs=64)
    assert found.prediction.total_throughput > 1.5 * plain


def _best_uncompressed(w: Workload, hw, budgets, gbs: int) -> float:
    """The fastest plan without compression over a grid of weight and cache splits (all on gpu or cpu)."""
    best = 0.0
    work = Workload(cfg=w.cfg, prompt_len=w.prompt_len, gen_len=w.gen_len, num_prompts=gbs, dtype=w.dtype)
    for wg, cg in itertools.product(range(0, 101, 10), range(0, 101, 25)):
        for ccc in (False, True) if cg < 100 else (False,):
            plan = Plan(gpu_batch_size=gbs, offload=OffloadPolicy(w_gpu_percent=wg, w_cpu_percent=100 - wg,
                        cache_gpu_percent=cg, cache_cpu_percent=100 - cg, cpu_cache_compute=ccc))
            need = peak_bytes(work, plan)
            if all(need[t] <= budgets[t] for t in budgets):
                best = max(best, predict(work, plan, hw, samples=16).total_throughput)
    return best


def test_flexgen_compresses_its_weights_when_that_is_faster():
    """OPT-175B, 512/32 on FlexGen's T4: 4-bit weights cross the link at a quarter of the bytes, so the
    searched plan compresses them (the old search never tried compress_weight)."""
    t4 = load_profile("t4-16g")
    found = search_flexgen(_workload("opt-175b", prompt=512, gen=32), t4, budgets_from(t4), gpu_batch_size=32,
                           num_gpu_batches=1)
    assert found is not None and found.plan.offload.compress_weight


@pytest.mark.parametrize("gpu, cpu, allowed", [(100, 0, True), (0, 100, True), (0, 0, True), (50, 50, False),
                                               (75, 0, False), (0, 30, False)])
def test_a_compressed_cache_is_never_split_between_tiers(gpu, cpu, allowed):
    """FlexGen's assert (flex_opt.py: no compressed cache on its mixed device): the search's plans keep a
    compressed cache wholly on gpu, cpu or disk, and a split compressed one never fits."""
    policy = OffloadPolicy(cache_gpu_percent=gpu, cache_cpu_percent=cpu, compress_cache=True)
    assert flexgen_allows(policy) is allowed
    assert flexgen_allows(dataclasses.replace(policy, compress_cache=False))
    w = _workload("opt-125m", prompt=64, gen=8)
    ev = _Eval(w, T4, budgets_from(T4))
    assert ev.fits(Plan(gpu_batch_size=4, offload=policy)) is allowed


@pytest.mark.parametrize("sparsity, buffered", [(0.5, False), (0.9, True)])
def test_alisa_gathers_picks_per_step_when_buffers_would_push_weights_off_the_gpu(sparsity, buffered):
    """OPT-30B, batch 64, 128/512 on an H100 with INT8 SWA: at 50% sparsity a buffer per layer for the picks
    would not fit beside the 60 GB of weights, so the plan gathers them each step and keeps every weight
    on the gpu; at 90% the buffers fit, and only new picks cross the link."""
    h100 = load_profile("h100-80g")
    kv = KVSettings(policy=get_policy("swa", sparsity=sparsity), bits=8)
    found = search_alisa(_workload("opt-30b", prompt=128, gen=512, kv=kv), h100, budgets_from(h100),
                         gpu_batch_size=64, num_gpu_batches=1)
    assert found is not None and _fits(found, budgets_from(h100))
    assert found.plan.offload.pick_buffer is buffered
    assert found.plan.offload.w_gpu_percent == 100
