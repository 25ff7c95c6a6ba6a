"""Plan search: the fastest plan that fits every tier, found greedily over the cost model.

Deterministic and quick (each candidate is one `runner.plan.cost_model.predict` on a few sampled decode
steps, so opt-175b takes well under 5 s):
- batch shape: `gpu_batch_size` over powers of two and, for each, `num_gpu_batches` doubling until
  throughput falls or nothing fits (either may be fixed by the job);
- FlexGen's policy (`search_flexgen`): start with everything on the gpu, move 10-point steps of
  weights, KV or the activations down a tier, cheapest time per byte freed first, until every tier
  fits, from each of FlexGen's compression settings (compress_weight, compress_cache: its whole policy
  space, whatever the job's own KV); then hill-climb with 5-point moves and jumps (cpu_cache_compute,
  either compression switched) while throughput improves. As FlexGen asserts, a compressed cache lives
  wholly on one tier, never split between gpu and cpu (`flexgen_allows`);
- ALISA (`search_alisa`): weights and activations placed the same way; for the KV, each offload
  ratio alpha at the latest phase II start p1 that fits the gpu, the fastest of them, then the
  recompute ratio beta (with that alpha or a larger one) and phase III start p2 that predict the most
  throughput (ALISA §V-A's greedy over its cost model).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from runner.memory.tiers import Tier
from runner.plan.cost_model import Plan, Prediction, Workload, peak_bytes, predict
from runner.plan.hardware import HardwareProfile
from runner.kv.spec import KVSettings
from runner.offload.policy import KVPlacement, OffloadPolicy
from runner.units import gib_to_bytes

SAMPLES = 16  # decode steps the search's estimates sample (the final prediction uses every step)
BATCHES = tuple(2 ** i for i in range(11))  # gpu_batch_size candidates 1..1024
MAX_GPU_BATCHES = 64
# A hill-climbing move must predict this much more throughput: smaller gains are inside the model's error,
# and such moves only add data on slower tiers (a first search-quality-flexgen run moved 10% of the KV to
# disk for a predicted +0.02%).
MIN_GAIN = 0.01
TIERS = tuple(Tier)
ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)  # ALISA's offload ratio candidates
BETAS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)  # and its recompute ratio's
_WHOLE_TIERS = ((100.0, 0.0), (0.0, 100.0), (0.0, 0.0))  # (cache_gpu_percent, cache_cpu_percent): all gpu, cpu, disk
_DOWN = ((Tier.GPU, Tier.CPU), (Tier.CPU, Tier.DISK), (Tier.GPU, Tier.DISK))  # (from, to): moves to a slower tier


@dataclass(frozen=True)
class SearchResult:
    plan: Plan
    prediction: Prediction  # every decode step
    workload: Workload  # as searched (num_prompts: one full block)
    evaluated: int  # cost-model evaluations
    seconds: float


class _Eval:
    """Memoised cost-model calls and budget checks for one workload (the search revisits plans)."""

    def __init__(self, w: Workload, hw: HardwareProfile, budgets: dict[Tier, float]):
        self.w, self.hw, self.budgets, self.count = w, hw, budgets, 0
        self._peaks: dict[Plan, dict[Tier, int] | None] = {}
        self._thr: dict[Plan, float] = {}

    def workload(self, plan: Plan) -> Workload:
        return dataclasses.replace(self.w, num_prompts=plan.gpu_batch_size * plan.num_gpu_batches)

    def peaks(self, plan: Plan) -> dict[Tier, int] | None:
        if plan not in self._peaks:
            if plan.offload is not None and not flexgen_allows(plan.offload):
                self._peaks[plan] = None
                return None
            try:
                self._peaks[plan] = peak_bytes(self.workload(plan), plan)
            except ValueError:  # a policy the executor refuses (e.g. phases it cannot place)
                self._peaks[plan] = None
        return self._peaks[plan]

    def fits(self, plan: Plan) -> bool:
        need = self.peaks(plan)
        return need is not None and all(self.over(plan, t) <= 0 for t in TIERS)

    def over(self, plan: Plan, tier: Tier) -> float:
        need = self.peaks(plan)
        if need is None:
            return float("inf")
        over = need[tier] - self.budgets[tier]
        if tier is Tier.CPU and not self.hw.accelerator:  # one RAM holds both the gpu and the cpu tier
            over = max(over, need[Tier.GPU] + need[Tier.CPU] - self.hw.budget_bytes(Tier.CPU))
        return over

    def throughput(self, plan: Plan) -> float:
        if plan not in self._thr:
            self.count += 1
            self._thr[plan] = predict(self.workload(plan), plan, self.hw, samples=SAMPLES,
                                      quick=True).total_throughput
        return self._thr[plan]


def flexgen_allows(policy: OffloadPolicy) -> bool:
    """FlexGen's own constraint on its policy space (flexgen/flex_opt.py, SelfAttention.init_cache_one_gpu_batch:
    `assert device.device_type != DeviceType.MIXED` under compress_cache): a compressed cache lives wholly on
    one tier. The executor could split one; a FlexGen plan does not."""
    whole = (policy.cache_gpu_percent, policy.cache_cpu_percent) in _WHOLE_TIERS
    return not policy.compress_cache or policy.kv_placement is not KVPlacement.SEQUENCE or whole


def budgets_from(hw: HardwareProfile, gpu_gib: float | None = None, cpu_gib: float | None = None,
                 disk_gib: float | None = None) -> dict[Tier, float]:
    """Bytes per tier: a job's own budgets (GiB, as `hardware.gpu_gib`) where set, else the profile's."""
    given = {Tier.GPU: gpu_gib, Tier.CPU: cpu_gib, Tier.DISK: disk_gib}
    return {t: gib_to_bytes(given[t]) if given[t] is not None else hw.budget_bytes(t) for t in TIERS}


# ---------------------------------------------------------------- placement moves

def _with(plan: Plan, offload: OffloadPolicy) -> Plan:
    """`plan` with another offload policy (direct construction: the search builds tens of thousands)."""
    return Plan(gpu_batch_size=plan.gpu_batch_size, num_gpu_batches=plan.num_gpu_batches, offload=offload)


@functools.lru_cache(maxsize=1 << 16)  # each batch shape tried walks the same moves from the same start
def _move(policy: OffloadPolicy, kind: str, src: Tier, dst: Tier, step: float) -> OffloadPolicy | None:
    """`step` points of weights ('w') or KV ('cache') from tier src to dst; None if not possible."""
    values = policy.values()
    pct = {t: values[f"{kind}_{t.value}_percent"] for t in (Tier.GPU, Tier.CPU)}
    pct[Tier.DISK] = 100 - pct[Tier.GPU] - pct[Tier.CPU]
    step = min(step, pct[src])
    if step <= 0:
        return None
    pct[src] -= step
    pct[dst] += step
    return dataclasses.replace(policy, **{f"{kind}_gpu_percent": pct[Tier.GPU], f"{kind}_cpu_percent": pct[Tier.CPU]})


@functools.lru_cache(maxsize=1 << 16)
def _act(policy: OffloadPolicy, tier: Tier) -> OffloadPolicy | None:
    pct = {Tier.GPU: (100.0, 0.0), Tier.CPU: (0.0, 100.0), Tier.DISK: (0.0, 0.0)}[tier]
    if policy.act_tier is tier:
        return None
    return dataclasses.replace(policy, act_gpu_percent=pct[0], act_cpu_percent=pct[1])


def _moves(policy: OffloadPolicy, step: float, kinds: tuple[str, ...], down_only: bool) -> Iterator[OffloadPolicy]:
    pairs = list(_DOWN) if down_only else [*_DOWN, *((b, a) for a, b in _DOWN)]
    for kind in kinds:
        for src, dst in pairs:
            if (moved := _move(policy, kind, src, dst, step)) is not None:
                yield moved
    for tier in (Tier.CPU, Tier.DISK) if down_only else TIERS:
        if (moved := _act(policy, tier)) is not None:
            yield moved


def _fit(ev: _Eval, plan: Plan, kinds: tuple[str, ...]) -> Plan | None:
    """Move data down until every tier fits, each time the move costing least time per byte freed."""
    for _ in range(200):
        tier = next((t for t in TIERS if ev.over(plan, t) > 0), None)
        if tier is None:
            return plan
        base_time, base_over = 1 / max(ev.throughput(plan), 1e-12), ev.over(plan, tier)
        best, best_cost = None, float("inf")
        for cand in _freeing(ev, plan, tier, kinds, base_over):
            freed = base_over - ev.over(cand, tier)
            cost = (1 / max(ev.throughput(cand), 1e-12) - base_time) / freed
            if cost < best_cost:
                best, best_cost = cand, cost
        if best is None:
            return None
        plan = best
    return None


def _freeing(ev: _Eval, plan: Plan, tier: Tier, kinds: tuple[str, ...], over: float) -> Iterator[Plan]:
    """For each way down, the smallest move in 10-point steps that frees bytes on `tier` (weights move
    as whole tensors by FlexGen's midpoint rule, so a small step can move none)."""
    policy = plan.offload
    for kind in kinds:
        for src, dst in _DOWN:
            for step in range(10, 101, 10):
                moved = _move(policy, kind, src, dst, float(step))
                if moved is None:
                    break
                cand = _with(plan, moved)
                if ev.over(cand, tier) < over:
                    yield cand
                    break
    for t in (Tier.CPU, Tier.DISK):
        if (moved := _act(policy, t)) is not None and ev.over(cand := _with(plan, moved),
                                                                tier) < over:
            yield cand


def _climb(ev: _Eval, plan: Plan, kinds: tuple[str, ...], extra: Callable[[OffloadPolicy], list[OffloadPolicy]]
           ) -> tuple[Plan, float]:
    """Hill-climb with 5-point moves (and `extra` toggles) while predicted throughput rises."""
    best = ev.throughput(plan)
    for _ in range(100):
        cands = [_with(plan, p) for p in [*_moves(plan.offload, 5.0, kinds, False),
                                                                 *extra(plan.offload)]]
        scored = [(ev.throughput(c), c) for c in cands if ev.fits(c)]
        if not scored:
            break
        top, cand = max(scored, key=lambda x: x[0])
        if top <= best * (1 + MIN_GAIN):
            break
        best, plan = top, cand
    return plan, best


def _jumps(policy: OffloadPolicy) -> list[OffloadPolicy]:
    """Jumps 5-point moves cannot reach one at a time (the weights as they are): the KV split in quarters
    between gpu and cpu, each with and without FlexGen's cpu_cache_compute, which pays off only once much
    of the KV sits on cpu; the KV compressed wholly on each tier (never with cpu_cache_compute, which
    attends over uncompressed KV); and compress_weight switched."""
    out = []
    for gpu in (0.0, 25.0, 50.0, 75.0, 100.0):
        for ccc in (False, True) if gpu < 100 else (False,):
            out.append(dataclasses.replace(policy, cache_gpu_percent=gpu, cache_cpu_percent=100 - gpu,
                                           cpu_cache_compute=ccc, compress_cache=False))
    for gpu, cpu in _WHOLE_TIERS:
        out.append(dataclasses.replace(policy, cache_gpu_percent=gpu, cache_cpu_percent=cpu,
                                       cpu_cache_compute=False, compress_cache=True))
    out.append(dataclasses.replace(policy, compress_weight=not policy.compress_weight))
    return [p for p in out if p != policy]


# ---------------------------------------------------------------- per family

def _flexgen_place(ev: _Eval, gbs: int, ngb: int) -> Plan | None:
    """Everything moved down until it fits, from each of FlexGen's compression settings, the fastest (a
    batch whose 16-bit weights or KV fit nowhere may fit compressed). A compressed cache moves only as a
    whole (`flexgen_allows`), so its fit takes the 100-point moves."""
    starts = [OffloadPolicy(compress_weight=cw, compress_cache=cc) for cw in (False, True) for cc in (False, True)]
    fits = [_fit(ev, Plan(gpu_batch_size=gbs, num_gpu_batches=ngb, offload=p), ("w", "cache")) for p in starts]
    fits = [p for p in fits if p is not None]
    return max(fits, key=ev.throughput) if fits else None


def _flexgen_climb(ev: _Eval, plan: Plan) -> tuple[Plan, float]:
    return _climb(ev, plan, ("w", "cache"), _jumps)


def _grid(lo: int, hi: int, n: int = 16) -> list[int]:
    """About n lengths from hi down to lo, multiples of 16 (the token cache moves 16-token chunks)."""
    step = max(16, (hi - lo) // n // 16 * 16)
    return sorted({hi, *range(max(16, lo // 16 * 16), hi, step)}, reverse=True)


def _phases(ev: _Eval, plan: Plan) -> tuple[Plan, float] | None:
    """ALISA's KV schedule for a fixed weight placement: each offload ratio at the latest p1 that fits,
    the fastest of them, then the recompute ratio, p2 and a larger offload ratio that predict the most
    throughput."""
    w = ev.w
    end = w.prompt_len + w.gen_len  # p1 = end: phase I throughout
    best: tuple[float, Plan] | None = None
    for alpha in ALPHAS:
        for p1 in ([end] if alpha == 0 else _grid(1, end - 1)):
            cand = _with(plan, dataclasses.replace(
                plan.offload, p1=p1, p2=end, offload_ratio=alpha, recompute_ratio=0.0))
            if ev.fits(cand):
                thr = ev.throughput(cand)
                if best is None or thr > best[0]:
                    best = (thr, cand)
                break
        if best is not None and alpha == 0.0:
            return best[1], best[0]  # everything stays on the gpu: nothing to schedule
    if best is None:
        return None
    thr, plan = best
    p1, alpha = plan.offload.p1, plan.offload.offload_ratio
    # Phase III's kept activations take gpu memory the window held: each recompute ratio is also tried
    # with the larger offload ratios, whose smaller windows may make room for it.
    for a in (x for x in ALPHAS if x >= alpha):
        for beta in (b for b in BETAS if b <= a):
            for p2 in _grid(p1, end - 1, 8):
                cand = _with(plan, dataclasses.replace(
                    plan.offload, p2=p2, offload_ratio=a, recompute_ratio=beta))
                if ev.fits(cand) and (t := ev.throughput(cand)) > thr:
                    thr, plan = t, cand
    return plan, thr


def _alisa_place(ev: _Eval, gbs: int, ngb: int, pick_buffer: bool | None = None) -> Plan | None:
    """Weights (and activations) placed to fit beside the smallest KV schedule; the schedule follows.
    A scoring policy's picks stay buffered on the gpu, or are gathered every step (pick_buffer: false):
    unless `pick_buffer` fixes one, both are tried and the faster kept, since the buffers' gpu memory
    may cost more (weights off the gpu, an earlier phase II) than the per-step fetches cost on the link."""
    end = ev.w.prompt_len + ev.w.gen_len
    found = []
    paths = (True, False) if pick_buffer is None else (pick_buffer,)
    for buffered in paths if ev.w.kv.policy.scoring is not None else (True,):
        tight = OffloadPolicy(kv_placement=KVPlacement.TOKEN, p1=16, p2=end, offload_ratio=0.98, pick_buffer=buffered)
        plan = _fit(ev, Plan(gpu_batch_size=gbs, num_gpu_batches=ngb, offload=tight), ("w",))
        scheduled = None if plan is None else _phases(ev, plan)
        if scheduled is not None:
            found.append(scheduled)
    return max(found, key=lambda x: x[1])[0] if found else None


def _alisa_climb(ev: _Eval, plan: Plan) -> tuple[Plan, float]:
    return _climb(ev, plan, ("w",), lambda p: [])


# ---------------------------------------------------------------- batch shape

def _search(ev: _Eval, place: Callable[[_Eval, int, int], Plan | None], climb: Callable[[_Eval, Plan], tuple],
            gbs: int | None, ngb: int | None) -> tuple[Plan, float] | None:
    found: list[tuple[float, Plan]] = []
    for b in [gbs] if gbs else BATCHES:
        prev = 0.0
        for k in [ngb] if ngb else [2 ** i for i in range(MAX_GPU_BATCHES.bit_length())]:
            plan = place(ev, b, k)
            if plan is None or not ev.fits(plan):
                break
            thr = ev.throughput(plan)
            found.append((thr, plan))
            if thr <= prev:
                break
            prev = thr
        if not prev and not gbs:
            break  # not even one GPU batch of b fits: larger ones will not either
    if not found:
        return None
    found.sort(key=lambda x: -x[0])
    return max((climb(ev, plan) for _, plan in found[:3]), key=lambda x: x[1])


def _result(ev: _Eval, found: tuple[Plan, float] | None, t0: float) -> SearchResult | None:
    if found is None:
        return None
    plan = found[0]
    w = ev.workload(plan)
    return SearchResult(plan=plan, prediction=predict(w, plan, ev.hw), workload=w, evaluated=ev.count,
                        seconds=time.perf_counter() - t0)


def search_alisa(w: Workload, hw: HardwareProfile, budgets: dict[Tier, float], *, gpu_batch_size: int | None = None,
                 num_gpu_batches: int | None = None, pick_buffer: bool | None = None) -> SearchResult | None:
    """The fastest token-placement plan for `w` (its own KV policy and bits), or None if none fits;
    `pick_buffer`: keep the picks buffered (True) or gathered every step (False), else the faster."""
    t0, ev = time.perf_counter(), _Eval(w, hw, budgets)
    place = functools.partial(_alisa_place, pick_buffer=pick_buffer)
    return _result(ev, _search(ev, place, _alisa_climb, gpu_batch_size, num_gpu_batches), t0)


def search_flexgen(w: Workload, hw: HardwareProfile, budgets: dict[Tier, float], *, gpu_batch_size: int | None = None,
                   num_gpu_batches: int | None = None, keep_kv: bool = False) -> SearchResult | None:
    """The fastest FlexGen plan (per-sequence KV split) for `w` over FlexGen's whole policy space,
    compress_weight and compress_cache included: with FlexGen's dense 16-bit attention, or with `keep_kv`
    the workload's own KV policy (16-bit, retained or evicted; a compressed cache is then refused by the executor's
    sizing, so those plans never fit)."""
    t0, ev = time.perf_counter(), _Eval(w if keep_kv else dataclasses.replace(w, kv=KVSettings()), hw, budgets)
    return _result(ev, _search(ev, _flexgen_place, _flexgen_climb, gpu_batch_size, num_gpu_batches), t0)
