"""Where the block executor keeps each GPU batch's KV: the plain store on the gpu tier, FlexGen's
per-sequence split (runner/offload/sequence_kv.py) or ALISA's per-token phases (runner/offload/token_kv.py).

`KVPlacer` plans the bytes each tier needs for a block (checked before anything is allocated),
builds each GPU batch's cache, and sums what the caches moved and recomputed for the CSV.
"""
from __future__ import annotations

import collections
from collections.abc import Callable

import torch

from runner.model.config import ModelConfig
from runner.memory.copy_engine import CopyEngine
from runner.kv.picks import buffer_bytes
from runner.kv.protocol import KVCacheBase, KVTraffic
from runner.offload.sequence_kv import SequenceSplitKV, WorkingSlots, split_rows
from runner.kv.spec import KVMode, QuantAxis
from runner.kv.store import KVSettings, kv_bytes
from runner.offload.token_kv import TokenTieredKV
from runner.offload.phases import TokenPhases
from runner.memory.tiers import Memory, Tier
from runner.offload.policy import KVPlacement, OffloadPolicy


COMPRESS_GROUP = 64  # FlexGen's CompressionConfig for the cache: 4 bits, group 64


class KVPlacer:
    """KV storage of the block's GPU batches under an offload policy."""

    def __init__(self, cfg: ModelConfig, policy: OffloadPolicy, kv: KVSettings, memory: Memory,
                 engine: CopyEngine, dtype: torch.dtype):
        self.cfg, self.policy, self.kv, self.memory, self.engine, self.dtype = cfg, policy, kv, memory, engine, dtype
        self.phases: TokenPhases | None = None
        if policy.kv_placement is KVPlacement.TOKEN:
            self.phases = TokenPhases(p1=policy.p1, p2=policy.p2, offload_ratio=policy.offload_ratio,
                                      recompute_ratio=policy.recompute_ratio)
        self.split = policy.kv_placement is KVPlacement.SEQUENCE and (policy.cache_gpu_percent < 100
                                                                       or policy.compress_cache)
        # FlexGen's compress_cache: 4-bit groups of 64 (of the head dim, when a head is smaller).
        self.compress = min(COMPRESS_GROUP, cfg.head_dim) if policy.compress_cache else None
        self._check_kv()
        self.slots: WorkingSlots | None = None
        self.max_new = 0  # tokens generated per block: a cache's prompt width is its capacity minus this
        self.caches: list[KVCacheBase] = []
        self.done = KVTraffic()  # traffic of caches already freed

    def _check_kv(self) -> None:
        if self.policy.cpu_cache_compute and (self.kv.policy.name != "dense" or self.compress is not None):
            raise ValueError("offload.cpu_cache_compute: attention on the cpu rows' home runs dense over "
                             "uncompressed KV; use kv.policy: dense and compress_cache: false")
        if not (self.split or self.phases):
            return
        if self.kv.mode is KVMode.EVICT:
            raise ValueError("kv.mode: evict frees KV for good; offloading it is not supported, use retain")
        if self.split and self.kv.bits != 16:
            raise ValueError("kv.bits: FlexGen's per-sequence split stores the compute dtype, or 4 bits with "
                             "offload.compress_cache; use kv_placement: token for INT8 KV on cpu")
        if self.phases and self.kv.bits != 16 and self.kv.quant_axis is not QuantAxis.HIDDEN:
            raise ValueError("kv.quant_axis: token placement fetches single tokens; use hidden")

    @property
    def offloaded(self) -> bool:
        return bool(self.split or self.phases)

    # ---- planning ------------------------------------------------------------------------------
    def plan(self, shapes: list[tuple[int, int]], max_new: int) -> dict[Tier, dict[str, int]]:
        """Bytes per tier and part for GPU batches of (rows, max_len) each, max_new of them generated."""
        need: dict[Tier, dict[str, int]] = {t: {} for t in Tier}
        per_shape: dict[tuple[int, int], list[tuple[Tier, str, int]]] = {}  # GPU batches mostly share one shape
        for k, (b, n) in enumerate(shapes):
            if (b, n) not in per_shape:
                per_shape[b, n] = self._plan_one(b, n, max_new)
            for tier, part, nbytes in per_shape[b, n]:
                need[tier][part.format(k=k)] = nbytes
        if self.split:
            need[Tier.GPU]["2 KV working slots"] = WorkingSlots.plan_bytes(self._slot_shape(shapes), self.dtype)
        return need

    def plan_totals(self, shapes: list[tuple[int, int]], max_new: int) -> dict[Tier, int]:
        """`plan` summed per tier, each distinct shape planned once (the plan search asks this for
        thousands of plans and needs no part names)."""
        out = {t: 0 for t in Tier}
        for (b, n), count in collections.Counter(shapes).items():
            for tier, _, nbytes in self._plan_one(b, n, max_new):
                out[tier] += count * nbytes
        if self.split:
            out[Tier.GPU] += WorkingSlots.plan_bytes(self._slot_shape(shapes), self.dtype)
        return out

    def _plan_one(self, b: int, n: int, max_new: int) -> list[tuple[Tier, str, int]]:
        """(tier, part name with a {k} for the GPU batch, bytes) of one GPU batch of b rows and n slots."""
        c, kv = self.cfg, self.kv
        if self.phases:
            gpu, cpu = TokenTieredKV.plan_bytes(c, b, n, self.dtype, self.phases, kv.bits, kv.group_size,
                                                min_len=n - max_new)
            out = [(Tier.GPU, "KV window and activations of GPU batch {k}", gpu),
                   (Tier.CPU, "KV home of GPU batch {k}", cpu)]
        elif self.split:
            split = split_rows(b, self.policy.cache_gpu_percent, self.policy.cache_cpu_percent)
            out = [(tier, f"KV of GPU batch {{k}} ({tier.value} rows)", nbytes)
                   for tier, nbytes in SequenceSplitKV.plan_bytes(c, split, n, self.dtype, self.compress).items()]
        else:
            return [(Tier.GPU, "KV cache of GPU batch {k}", kv_bytes(c, kv, b, n, self.dtype))]
        return out + [(Tier.GPU, "SWA picks of GPU batch {k}", self._picks_bytes(b, n))]

    def _picks_bytes(self, b: int, n: int) -> int:
        scoring = self.kv.policy.scoring
        if scoring is None:
            return 0
        groups = self.cfg.num_kv_heads if scoring.per_head else 1
        m = self.kv.policy.split(n)[1]
        # Without buffers: a layer's gather while it attends, and the next one's, fetched ahead (fetch_ahead).
        layers = self.cfg.num_layers if self.policy.pick_buffer else min(2, self.cfg.num_layers)
        return layers * buffer_bytes(b, self.cfg.num_kv_heads, groups, self.cfg.head_dim, m, self.dtype)

    def _slot_shape(self, shapes: list[tuple[int, int]]) -> tuple[int, int, int, int]:
        return (max(b for b, _ in shapes), self.cfg.num_kv_heads, max(n for _, n in shapes), self.cfg.head_dim)

    # ---- caches --------------------------------------------------------------------------------
    def begin_block(self, shapes: list[tuple[int, int]], max_new: int) -> None:
        self.max_new = max_new
        if self.split:
            self.slots = WorkingSlots(self.memory, self._slot_shape(shapes), self.dtype)

    def cache_factory(self) -> Callable[[int, int], KVCacheBase] | None:
        """make_cache(batch, capacity) for a GPU batch's KVStore, or None for the plain cache."""
        if not self.offloaded:
            return None

        def make(batch: int, capacity: int) -> KVCacheBase:
            if self.phases:
                cache = TokenTieredKV(self.cfg, batch, capacity, self.dtype, phases=self.phases, memory=self.memory,
                                      engine=self.engine, bits=self.kv.bits, group_size=self.kv.group_size,
                                      min_len=capacity - self.max_new)
            else:
                split = split_rows(batch, self.policy.cache_gpu_percent, self.policy.cache_cpu_percent)
                cache = SequenceSplitKV(self.cfg, batch, capacity, self.dtype, split=split, memory=self.memory,
                                        engine=self.engine, slots=self.slots, compress=self.compress,
                                        cpu_compute=self.policy.cpu_cache_compute)
            self.caches.append(cache)
            return cache
        return make

    def end_block(self) -> None:
        """Free the block's caches and working slots (also after a failure)."""
        for cache in self.caches:
            if cache.traffic is not None:
                self.done += cache.traffic
            cache.free()
        self.caches = []
        if self.slots is not None:
            self.slots.free()
            self.slots = None

    def traffic(self) -> KVTraffic:
        """What token-tiered caches moved and recomputed so far (freed ones included)."""
        out = self.done + KVTraffic()  # a copy: not the running total itself
        for cache in self.caches:
            if cache.traffic is not None:
                out += cache.traffic
        return out

    def reset(self) -> None:
        self.done = KVTraffic()
