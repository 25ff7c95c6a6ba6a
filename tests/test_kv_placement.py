"""KV placement in the block executor: FlexGen's per-sequence split and ALISA's three token phases give
the plain path's tokens and logits, move the bytes they should, and recompute K/V exactly.

Tolerance (see tests/test_executor.py for the weight-placement side): with KV in the compute dtype, a
placement only moves bytes, so logits stay within float32 rounding (TINY_ATOL; SPARSE_ATOL with SWA,
whose attention sums the same terms in another order on the two paths). Phase III recomputes
K/V with a matmul over a different number of rows than the original, so a BLAS may round differently
(~1 ulp per element, checked directly in test_recomputed_kv_equals_the_kv_it_replaces); the 1e-5 on
logits of magnitude ~1 does not always hold after several layers of it (seen: 1.05e-5 on logits of
magnitude ~4), so phase III runs use RECOMPUTE_ATOL = 1e-4: ten times the observed drift, still three
orders below what a wrong token, position or stale K/V causes (O(0.1)). INT8 on cpu is a real approximation: its bound is justified there.
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from policies import get_policy
from runner.memory.copy_engine import CopyEngine
from runner.plan.cost_model import Plan, Workload, peak_bytes
from runner.offload.executor import OffloadPolicy
from runner.kv.picks import buffer_bytes
from runner.offload.sequence_kv import split_rows
from runner.kv.spec import KVSettings
from runner.offload.token_kv import TokenTieredKV
from runner.offload.phases import TokenPhases
from runner.engines.lm import LM, Batch
from runner.memory.tiers import BudgetError, Memory, Tier, TierBudgets
from runner.offload.policy import KVPlacement
from runner.spec import JobError
from test_executor import (PROMPTS, SPARSE_ATOL, STEPS, TINY_ATOL, _assert_same, check_against_plain, offloaded, plain,  # noqa: F401
                           tiny)  # tiny: the fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECOMPUTE_ATOL = 1e-4
SWA = get_policy("swa", sparsity=0.8)
KVS = {"dense": KVSettings(), "swa0.8": KVSettings(policy=SWA)}
TOKEN = dict(kv_placement=KVPlacement.TOKEN)
PLACEMENTS = {
    "seq-cpu": dict(cache_gpu_percent=0, cache_cpu_percent=100),
    "seq-mixed": dict(cache_gpu_percent=25, cache_cpu_percent=50),  # and 25% on disk
    "tok-I": dict(**TOKEN, p1=10_000, p2=10_000, offload_ratio=0.6),  # never leaves phase I
    "tok-II": dict(**TOKEN, p1=8, p2=10_000, offload_ratio=0.6),
    "tok-III": dict(**TOKEN, p1=8, p2=16, offload_ratio=0.6, recompute_ratio=0.3),
    # ALISA Alg. 2's data path: picks gathered every step, fetched ahead of their layer
    "tok-III-gathered": dict(**TOKEN, p1=8, p2=16, offload_ratio=0.6, recompute_ratio=0.3, pick_buffer=False),
}


def _policy(placement: str, overlap: bool = True, **fields) -> OffloadPolicy:
    return OffloadPolicy(**PLACEMENTS[placement], overlap=overlap, **fields)


@pytest.mark.parametrize("family, placement, overlap, ngb, kv", [
    *itertools.product(["llama"], PLACEMENTS, [True, False], [1, 4], KVS),
    *itertools.product(["opt"], ["seq-mixed", "tok-III"], [True], [1, 4], KVS),
])
def test_kv_placements_match_plain_path(tiny, tmp_path, compute_device, family, placement, overlap, ngb, kv):
    atol = RECOMPUTE_ATOL if placement.startswith("tok-III") else TINY_ATOL if kv == "dense" else SPARSE_ATOL
    stats = check_against_plain(tiny[family], tmp_path, _policy(placement, overlap), ngb, KVS[kv], atol,
                                compute_device)
    moved_up, moved_down = stats["kv_bytes_gpu_from_cpu"], stats["kv_bytes_cpu_from_gpu"]
    if placement.startswith("seq"):
        assert moved_up > 0 and moved_down > 0 and stats["bytes_gpu_from_cpu"] >= moved_up
    elif placement == "tok-I":
        assert moved_up == moved_down == 0 and stats["phase2_s"] == stats["phase3_s"] == 0
    else:
        assert moved_down > 0 and moved_up > 0
        phase3 = placement.startswith("tok-III")  # prompts of 30 columns: every decode step is past p2 = 16
        assert (stats["phase3_s"] > 0) == phase3 and (stats["phase2_s"] > 0) != phase3
        assert (stats["recomputed_tokens"] > 0) == phase3 == (stats["phase3_recompute_s"] > 0)
        for p in (2, 3):  # the per-phase breakdown adds up to the phase's step time
            parts = stats[f"phase{p}_wait_s"] + stats[f"phase{p}_recompute_s"] + stats[f"phase{p}_compute_s"]
            assert abs(parts - stats[f"phase{p}_s"]) < 1e-3


def test_weights_and_kv_offloaded_together(tiny, tmp_path):
    cfg, weights = tiny["llama"]
    ref = plain(cfg, weights, PROMPTS, 4, STEPS, KVS["swa0.8"])
    for placement in ("seq-mixed", "tok-III"):
        policy = _policy(placement, w_gpu_percent=30, w_cpu_percent=50)
        logits, tokens, stats = offloaded(cfg, weights, PROMPTS, policy, TierBudgets(offload_dir=str(tmp_path)),
                                          4, 2, STEPS, KVS["swa0.8"])
        _assert_same(ref, (logits, tokens), RECOMPUTE_ATOL)
        assert stats["bytes_disk_read"] > 0 and stats["bytes_gpu_from_cpu"] > stats["kv_bytes_gpu_from_cpu"]


def test_flexgen_split_moves_whole_offloaded_sequences_every_step(tiny, tmp_path):
    """cache_cpu_percent 100 with dense attention: each decode step loads every layer's K and V of all
    rows for all positions so far, and writes one token back: exactly FlexGen's traffic."""
    cfg, weights = tiny["llama"]
    prompts = [p[:12] for p in PROMPTS[:4]]  # equal lengths: no padding, one width
    _, _, stats = offloaded(cfg, weights, prompts, _policy("seq-cpu"), TierBudgets(offload_dir=str(tmp_path)),
                            4, 1, STEPS, KVS["dense"])
    per_layer_token = 4 * cfg.num_kv_heads * cfg.head_dim * 4  # K (or V) of one position, 4 rows, float32
    loads = sum(12 + t for t in range(STEPS - 1))  # decode step t+1 loads the 12 + t positions written so far
    assert stats["kv_bytes_gpu_from_cpu"] == 2 * cfg.num_layers * loads * per_layer_token
    assert stats["kv_bytes_cpu_from_gpu"] == 2 * cfg.num_layers * (12 + STEPS - 1) * per_layer_token


def test_token_placement_moves_far_fewer_bytes_than_flexgen(tiny, tmp_path):
    cfg, weights = tiny["llama"]
    prompts = [p[:12] for p in PROMPTS[:4]]
    moved = {}
    for placement in ("seq-cpu", "tok-II"):
        _, _, stats = offloaded(cfg, weights, prompts, _policy(placement), TierBudgets(offload_dir=str(tmp_path)),
                                4, 1, 30, KVS["swa0.8"])
        moved[placement] = stats["kv_bytes_gpu_from_cpu"] + stats["kv_bytes_cpu_from_gpu"]
    assert 0 < moved["tok-II"] < moved["seq-cpu"] / 3


def test_per_step_picks_fetch_every_cpu_pick_and_match_the_buffered_run(tiny, tmp_path):
    """offload.pick_buffer off (ALISA Alg. 2's data path): the same selection, so the same logits within the
    sparse summation-order tolerance, but every cpu-resident pick comes up every step, so far more bytes
    cross the link than with the buffer, which fetches only picks new to it (here none: each pick was
    buffered while its token was still in the gpu window)."""
    cfg, weights = tiny["llama"]
    prompts = [p[:12] for p in PROMPTS[:4]]
    runs = {}
    for buffered in (True, False):
        policy = OffloadPolicy(**PLACEMENTS["tok-II"], pick_buffer=buffered)
        runs[buffered] = offloaded(cfg, weights, prompts, policy, TierBudgets(offload_dir=str(tmp_path)),
                                   4, 1, 30, KVS["swa0.8"])
    _assert_same(runs[True][:2], runs[False][:2], SPARSE_ATOL)
    up = {k: r[2]["kv_bytes_gpu_from_cpu"] for k, r in runs.items()}
    assert up[False] > 0 and up[False] > 3 * up[True]  # the buffer mostly catches picks before they migrate
    # Gathered picks are fetched ahead of their layer (load_cache), except those the step's own write
    # moves to cpu; buffered ones only when new to the buffer, inside the layer.
    ahead = {k: r[2]["kv_bytes_fetched_ahead"] for k, r in runs.items()}
    assert ahead[True] == 0 and up[False] / 2 < ahead[False] <= up[False]


def test_int8_on_cpu_stays_within_low_precision_tolerance(tiny, tmp_path):
    """INT8 (group 16 along the head dim) on the cpu tokens only: each element is off by at most half a
    quantization step (~0.2% of its group's range), but an SWA pick may flip on the perturbed scores, so
    the bound is the one the foundation holds bf16/fp16 to: 5% of the fp32 logit scale."""
    cfg, weights = tiny["llama"]
    kv8 = KVSettings(policy=SWA, bits=8, group_size=16)
    ref_logits, ref_tokens = plain(cfg, weights, PROMPTS, 8, STEPS, KVS["swa0.8"])
    logits, tokens, stats = offloaded(cfg, weights, PROMPTS, _policy("tok-II"), TierBudgets(offload_dir=str(tmp_path)),
                                      8, 1, STEPS, kv8)
    worst = max((a - b).abs().max().item() for a, b in zip(ref_logits, logits))
    scale = max(a.abs().max().item() for a in ref_logits)
    assert 0 < worst < 0.05 * scale
    assert stats["kv_bytes_cpu_from_gpu"] > 0
    assert (tokens == ref_tokens).float().mean().item() >= 0.9
    # Phase I only: nothing is quantized, so the run is the plain one.
    same = offloaded(cfg, weights, PROMPTS, _policy("tok-I"), TierBudgets(offload_dir=str(tmp_path)), 8, 1, STEPS, kv8)
    _assert_same((ref_logits, ref_tokens), same[:2], SPARSE_ATOL)


@pytest.mark.parametrize("bits", [16, 8])
def test_reads_fetched_ahead_equal_reads_fetched_in_the_layer(tiny, bits):
    """fetch_ahead (the executor's load_cache, before the layer runs) starts fetching the cpu-resident
    tokens the coming step reads: its recent run (here from position 14) and its picks. After that
    step's write, read and gather return exactly what they return without it, and the link carries the
    same bytes: the gpu window starts at 16 at length 39 and at 20 at length 40, so positions 16..19,
    moved to cpu by the write, come up in the layer, as without fetching ahead."""
    cfg, _ = tiny["llama"]
    b, kvh, d, width, start = 2, cfg.num_kv_heads, cfg.head_dim, 39, 14
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(b, kvh, width + 1, d, generator=gen) for _ in range(2))
    index = torch.tensor([[[0, 5, 13, 2]], [[1, 7, 9, 12]]])  # (b, 1, m): per-sequence picks, older than the run
    phases = TokenPhases(p1=1, p2=10_000, offload_ratio=0.5, recompute_ratio=0.0, chunk=4)
    assert (phases.gpu_from(width), phases.gpu_from(width + 1)) == (16, 20)
    memory = Memory(TierBudgets(offload_dir="unused"))
    got = {}
    with CopyEngine(memory, threads=1) as engine:
        for ahead in (False, True):
            cache = TokenTieredKV(cfg, b, width + 1, torch.float32, phases=phases, memory=memory, engine=engine,
                                  bits=bits, group_size=d, min_len=width)
            cache.write(0, k[:, :, :width], v[:, :, :width], 0)
            before = cache.traffic.up_bytes
            if ahead:
                cache.fetch_ahead(0, width + 1, start, index)
                early = cache.traffic.ahead_bytes
            cache.write(0, k[:, :, width:], v[:, :, width:], width)
            got[ahead] = (*cache.read(0, width + 1, start), *cache.gather(0, index), cache.traffic.up_bytes - before)
            cache.drop_ahead(0)
            assert cache.ahead[0] is None
            cache.free()
    for a, z in zip(got[False], got[True]):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(z))
    # Fetched ahead: the 8 picks and positions 14, 15 of both sequences; 16..19 of both come up in the layer.
    assert early > 0 and early * 20 == got[True][4] * 12
    want = k[torch.arange(b)[:, None, None], torch.arange(kvh)[None, :, None], index.expand(b, kvh, -1)]
    atol = 0 if bits == 16 else 0.02  # INT8: half a quantization step of a group's range
    torch.testing.assert_close(got[True][2], want, rtol=0, atol=atol)
    torch.testing.assert_close(got[True][0], k[:, :, start:], rtol=0, atol=atol)
    assert memory.gpu.in_use == memory.cpu.in_use == 0


def test_store_fetches_a_layers_reads_ahead_once_per_step(tiny):
    """The executor asks every unit's successor attention to load its cache, so an attention layer is asked
    twice a step (after the attention and after the MLP before it): the second ask must not fetch again.
    With both layers asked before the step, the step itself fetches nothing (the gpu window starts at 16
    at lengths 30 and 31, so its write moves nothing to cpu)."""
    cfg, weights = tiny["llama"]
    lm = LM(cfg, weights, torch.device("cpu"), torch.float32)
    memory = Memory(TierBudgets(offload_dir="unused"))
    phases = TokenPhases(p1=1, p2=10_000, offload_ratio=0.9, recompute_ratio=0.0, chunk=16)
    kv = dataclasses.replace(KVS["swa0.8"], pick_buffer=False)
    with CopyEngine(memory, threads=1) as engine:
        caches = []

        def make(b, n):
            caches.append(TokenTieredKV(cfg, b, n, torch.float32, phases=phases, memory=memory, engine=engine))
            return caches[-1]
        batch = Batch(lm, PROMPTS[:4], 3, kv, make_cache=make)
        tokens = batch.prefill().argmax(-1)
        assert batch.prompt_width == 30 and phases.gpu_from(30) == phases.gpu_from(31) == 16
        traffic = caches[0].traffic
        batch.kv.prefetch(1)
        ahead = traffic.ahead_bytes
        batch.kv.prefetch(1)
        assert traffic.ahead_bytes == ahead > 0 and traffic.up_bytes == ahead
        batch.kv.prefetch(0)
        assert traffic.ahead_bytes > ahead
        batch.decode(tokens)
        assert traffic.up_bytes == traffic.ahead_bytes and caches[0].ahead == [None, None]
        caches[0].free()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_recomputed_kv_equals_the_kv_it_replaces(tiny, family):
    """Prefill through a token-tiered cache whose phase III covers most positions, then read those
    positions back (recomputed from the kept layer inputs) and compare with the plain cache's K/V."""
    cfg, weights = tiny[family]
    lm = LM(cfg, weights, torch.device("cpu"), torch.float32)
    prompts = PROMPTS[:4]  # different lengths: rotary positions differ from slots on padded rows
    ref = Batch(lm, prompts, 2)
    ref.prefill()
    memory = Memory(TierBudgets(offload_dir="unused"))
    phases = TokenPhases(p1=1, p2=1, offload_ratio=0.9, recompute_ratio=0.8, chunk=1)
    with CopyEngine(memory, threads=0) as engine:
        caches = []

        def make(b, n):
            caches.append(TokenTieredKV(cfg, b, n, torch.float32, phases=phases, memory=memory, engine=engine))
            return caches[-1]
        got = Batch(lm, prompts, 2, make_cache=make)
        got.prefill()
        cache, width = caches[0], ref.prompt_width
        rec = cache.rec[0]
        assert rec == int(0.8 * width) and cache.traffic.recomputed == 0
        valid = ref.prompt_valid[:, :rec]  # padding slots hold no token (masked in attention)
        for layer in range(cfg.num_layers):
            k, v = cache.read(layer, rec)
            want_k, want_v = ref.kv.cache.read(layer, rec)
            for a, b in ((k, want_k), (v, want_v)):
                a, b = a.transpose(1, 2)[valid], b.transpose(1, 2)[valid]  # (tokens, kvh, d)
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
        assert cache.traffic.recomputed > 0
        cache.free()
    assert memory.gpu.in_use == memory.cpu.in_use == 0


def test_phase_boundaries():
    ph = TokenPhases(p1=100, p2=200, offload_ratio=0.5, recompute_ratio=0.25, chunk=16)
    assert [ph.phase(n) for n in (99, 100, 199, 200)] == [1, 2, 2, 3]
    assert ph.gpu_from(99) == 0 and ph.gpu_from(100) == 48 and ph.gpu_from(300) == 144
    assert ph.recompute_below(199) == 0 and ph.recompute_below(200) == 50
    assert all(ph.gpu_from(n) <= ph.gpu_from(n + 1) for n in range(1, 500))
    assert ph.window(500) == max(n - ph.gpu_from(n) for n in range(1, 501)) + 16
    assert ph.window(120) == 99 + 16  # the longest phase I length: everything on gpu
    assert ph.window(120, min_len=100) == 120 - 48 + 16  # a prompt of 100 never holds a phase I length


def test_split_rows_rounds_cumulatively():
    assert split_rows(8, 25, 50) == (2, 4, 2)
    assert split_rows(3, 50, 50) == (2, 1, 0)
    assert split_rows(4, 0, 100) == (0, 4, 0)


@pytest.mark.parametrize("settings, field", [
    (dict(**TOKEN, p2=4), "p1"),
    (dict(**TOKEN, p1=8, p2=4), "p2"),
    (dict(**TOKEN, p1=4, p2=8, offload_ratio=0.3, recompute_ratio=0.5), "recompute_ratio"),
    (dict(**TOKEN, p1=4, p2=8, offload_ratio=1.0), "offload_ratio"),
    (dict(**TOKEN, p1=4, p2=8, cache_gpu_percent=50), "cache_gpu_percent"),
    (dict(p1=4), "p1"),
])
def test_bad_token_placement_is_refused_by_name(settings, field):
    with pytest.raises(JobError, match=rf"^offload\.{field}:") as e:
        OffloadPolicy(**settings)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("placement", ["seq-mixed", "tok-III"])
def test_kv_placements_fit_budgets_set_to_their_own_peaks(tiny, tmp_path, placement):
    """Every KV tier allocation is planned and accounted: budgets equal to an unlimited run's peaks are
    enough for the same run, its peaks never pass them, and one byte less of gpu fails up front."""
    cfg, weights = tiny["llama"]
    args = (cfg, weights, PROMPTS, _policy(placement))
    _, _, free = offloaded(*args, TierBudgets(offload_dir=str(tmp_path)), 2, 4, STEPS, KVS["swa0.8"])
    peaks = {t: free[f"peak_{t}_pool_bytes" if t != "disk" else "peak_disk_bytes"] for t in ("gpu", "cpu", "disk")}
    assert peaks["cpu"] > 0
    tight = TierBudgets(gpu_bytes=peaks["gpu"], cpu_bytes=peaks["cpu"], disk_bytes=peaks["disk"],
                        offload_dir=str(tmp_path))
    _, _, stats = offloaded(*args, tight, 2, 4, STEPS, KVS["swa0.8"])
    assert stats["peak_gpu_pool_bytes"] <= peaks["gpu"] and stats["peak_cpu_pool_bytes"] <= peaks["cpu"]
    short = TierBudgets(gpu_bytes=peaks["gpu"], cpu_bytes=peaks["cpu"] - 1, disk_bytes=peaks["disk"],
                        offload_dir=str(tmp_path))
    with pytest.raises(BudgetError, match=r"^cpu: plan \(KV"):
        offloaded(*args, short, 2, 4, STEPS, KVS["swa0.8"])


@pytest.mark.parametrize("placement, ngb", [("seq-mixed", 1), ("seq-mixed", 4), ("seq-gpu", 1)])
def test_flexgen_compress_cache_equals_the_plain_4bit_cache(tiny, tmp_path, placement, ngb):
    """compress_cache stores 4-bit groups (of the head dim, 16 here) on every tier, and attention reads them
    dequantized, new token included: exactly what the plain path's kv.bits 4 cache computes."""
    splits = {"seq-mixed": PLACEMENTS["seq-mixed"], "seq-gpu": {}}
    policy = OffloadPolicy(**splits[placement], compress_cache=True)
    plain4 = KVSettings(policy=SWA, bits=4, group_size=tiny["llama"][0].head_dim)
    cfg, weights = tiny["llama"]
    gbs = len(PROMPTS) // ngb
    ref = plain(cfg, weights, PROMPTS, gbs, STEPS, plain4)
    logits, tokens, stats = offloaded(cfg, weights, PROMPTS, policy, TierBudgets(offload_dir=str(tmp_path)),
                                      gbs, ngb, STEPS, KVS["swa0.8"])
    _assert_same(ref, (logits, tokens), SPARSE_ATOL)
    if placement == "seq-mixed":  # 4-bit codes plus an fp32 scale and min per 16 values: 1/4 of fp32's bytes
        _, _, full = offloaded(cfg, weights, PROMPTS, _policy("seq-mixed"), TierBudgets(offload_dir=str(tmp_path)),
                               gbs, ngb, STEPS, KVS["swa0.8"])
        assert stats["kv_bytes_gpu_from_cpu"] * 4 == full["kv_bytes_gpu_from_cpu"]


@pytest.mark.parametrize("placement, ngb, overlap", [("seq-cpu", 1, True), ("seq-mixed", 4, True),
                                                     ("seq-mixed", 1, False)])
def test_cpu_cache_compute_matches_plain_path_and_moves_no_cpu_kv(tiny, tmp_path, placement, ngb, overlap):
    """FlexGen's cpu_cache_compute: the cpu rows' attention runs against their home, so their KV never
    crosses the link (only disk rows are loaded); queries go down and outputs come up instead."""
    policy = OffloadPolicy(**PLACEMENTS[placement], overlap=overlap, cpu_cache_compute=True)
    stats = check_against_plain(tiny["llama"], tmp_path, policy, ngb, KVS["dense"], TINY_ATOL)
    _, _, loaded = offloaded(*tiny["llama"], PROMPTS, _policy(placement), TierBudgets(offload_dir=str(tmp_path)),
                             len(PROMPTS) // ngb, ngb, STEPS, KVS["dense"])
    if placement == "seq-cpu":
        assert stats["kv_bytes_gpu_from_cpu"] == 0 < stats["bytes_gpu_from_cpu"]  # outputs, not KV
        assert stats["bytes_gpu_from_cpu"] < loaded["bytes_gpu_from_cpu"] / 3
    assert stats["kv_bytes_gpu_from_cpu"] < loaded["kv_bytes_gpu_from_cpu"]  # disk rows are still loaded
    with pytest.raises(ValueError, match=r"^offload\.cpu_cache_compute: .* kv\.policy: dense"):
        offloaded(*tiny["llama"], PROMPTS, policy, TierBudgets(offload_dir=str(tmp_path)), 8, 1, 2, KVS["swa0.8"])


def test_pick_buffer_off_needs_token_placement_and_reserves_two_layers(tiny):
    """Without buffers the gpu plan reserves two layers' gathers (the attending layer's and the next one's,
    fetched ahead) instead of one buffer per layer."""
    with pytest.raises(JobError, match=r"^offload.pick_buffer: only kv_placement: token"):
        OffloadPolicy(pick_buffer=False)
    cfg = dataclasses.replace(tiny["llama"][0], num_layers=5)
    w = Workload(cfg=cfg, prompt_len=40, gen_len=24, num_prompts=4, dtype=torch.float32, kv=KVS["swa0.8"])
    peaks = {buffered: peak_bytes(w, Plan(gpu_batch_size=4, offload=_policy("tok-II", pick_buffer=buffered)))
             for buffered in (True, False)}
    one = buffer_bytes(4, cfg.num_kv_heads, 1, cfg.head_dim, SWA.split(64)[1], torch.float32)
    assert peaks[True][Tier.GPU] - peaks[False][Tier.GPU] == (cfg.num_layers - 2) * one
    assert peaks[True][Tier.CPU] == peaks[False][Tier.CPU]
