"""Where the block executor keeps each GPU batch's KV: the plain store on the gpu tier, FlexGen's
per-sequence split (runner/offload/sequence_kv.py) or ALISA's per-token phases (runner/offload/token_kv.py).

`KVPlacer` plans the bytes each tier needs for a block (checked before anything is allocated;
the plain functions of `runner.offload.sizing.KVSizing`, which the planner calls too),
builds each GPU batch's cache, and sums what the caches moved and recomputed for the CSV.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from runner.model.config import ModelConfig
from runner.memory.copy_engine import CopyEngine
from runner.kv.protocol import KVCacheBase, KVTraffic
from runner.offload.sequence_kv import SequenceSplitKV, WorkingSlots, split_rows
from runner.kv.spec import KVSettings
from runner.offload.token_kv import TokenTieredKV
from runner.offload.phases import TokenPhases
from runner.memory.tiers import Memory, Tier
from runner.offload.policy import OffloadPolicy
from runner.offload.sizing import KVSizing


class KVPlacer:
    """KV storage of the block's GPU batches under an offload policy."""

    def __init__(self, cfg: ModelConfig, policy: OffloadPolicy, kv: KVSettings, memory: Memory,
                 engine: CopyEngine, dtype: torch.dtype):
        self.cfg, self.policy, self.kv, self.memory, self.engine, self.dtype = cfg, policy, kv, memory, engine, dtype
        self.sizing = KVSizing(cfg=cfg, policy=policy, kv=kv, dtype=dtype)  # checks the KV settings
        self.slots: WorkingSlots | None = None
        self.max_new = 0  # tokens generated per block: a cache's prompt width is its capacity minus this
        self.caches: list[KVCacheBase] = []
        self.done = KVTraffic()  # traffic of caches already freed

    @property
    def phases(self) -> TokenPhases | None:
        return self.sizing.phases

    @property
    def offloaded(self) -> bool:
        return self.sizing.offloaded

    # ---- planning ------------------------------------------------------------------------------
    def plan(self, shapes: list[tuple[int, int]], max_new: int) -> dict[Tier, dict[str, int]]:
        """`KVSizing.plan`: what `block_need` asks of the executor's KV side."""
        return self.sizing.plan(shapes, max_new)

    # ---- caches --------------------------------------------------------------------------------
    def begin_block(self, shapes: list[tuple[int, int]], max_new: int) -> None:
        self.max_new = max_new
        if self.sizing.split:
            self.slots = WorkingSlots(self.memory, self.sizing.slot_shape(shapes), self.dtype)

    def cache_factory(self) -> Callable[[int, int], KVCacheBase] | None:
        """make_cache(batch, capacity) for a GPU batch's KVStore, or None for the plain cache."""
        if not self.offloaded:
            return None

        def make(batch: int, capacity: int) -> KVCacheBase:
            if self.sizing.phases:
                cache = TokenTieredKV(self.cfg, batch, capacity, self.dtype, phases=self.sizing.phases, memory=self.memory,
                                      engine=self.engine, bits=self.kv.bits, group_size=self.kv.group_size,
                                      min_len=capacity - self.max_new)
            else:
                split = split_rows(batch, self.policy.cache_gpu_percent, self.policy.cache_cpu_percent)
                cache = SequenceSplitKV(self.cfg, batch, capacity, self.dtype, split=split, memory=self.memory,
                                        engine=self.engine, slots=self.slots, compress=self.sizing.compress,
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
