"""Schedulable layers for the block executor: one unit of `runner.model.layers` with its weights placed
across the memory tiers, behind the protocol the generation loop drives.

Placement follows FlexGen's `init_weight_list`: within one layer, each weight tensor goes to the tier
whose cumulative-percent band (disk first, then cpu, then gpu) holds the midpoint of the tensor's
cumulative-size fraction. So `w_gpu_percent` is a share of every layer's bytes, and a layer's small
tensors (norms, biases) fall wherever their neighbours' bytes put them.

A gpu-home tensor is used in place; cpu- and disk-home tensors are copied into a staging slot in the
gpu pool when the layer runs (`load_weight`), through the copy engine, so the executor can prefetch
the next layer's weights into the other slot while this one computes.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor

from runner.memory.copy_engine import CopyEngine, Handle
from runner.kv.quant import FLEXGEN_BITS, FLEXGEN_GROUP, QTensor, QuantLayout, dequantize, quantize
from runner.kv.store import KVStore
from runner.model import greedy_head
from runner.model.layers import Attention, ForwardState, Head, Shapes, Unit
from runner.memory.tiers import DiskTensor, Memory, Tier
from runner.offload.policy import OffloadPolicy

# Staged tensors start on 64-byte boundaries inside a slot: aligned operands keep the matmul kernels on
# their fast (and alignment-independent) paths.
_ALIGN_BYTES = 64


def split_by_size(shapes: Shapes, policy: OffloadPolicy) -> dict[str, Tier]:
    """Tier of each tensor of one layer, by FlexGen's midpoint-of-cumulative-size rule."""
    sizes = [math.prod(s) for s in shapes.values()]
    total = sum(sizes) or 1
    bands = ((policy.w_disk_percent, Tier.DISK), (policy.w_disk_percent + policy.w_cpu_percent, Tier.CPU))
    tiers, before = {}, 0
    for name, size in zip(shapes, sizes):
        mid = (before + size / 2) / total * 100
        tiers[name] = next((tier for edge, tier in bands if mid < edge), Tier.GPU)
        before += size
    return tiers


@dataclass(frozen=True)
class _Staged:
    name: str
    offset: int  # elements into the staging slot
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class WeightRead:
    """A layer's weights on the gpu tier, some still arriving: `wait()` before computing with them."""
    weights: dict[str, Tensor]
    handles: list[Handle]
    decode: list[tuple[Tensor, QTensor]] = field(default_factory=list)  # compressed: (slot view, codes)

    def wait(self) -> dict[str, Tensor]:
        for h in self.handles:
            h.wait()
        self.handles = []
        for view, q in self.decode:  # compress_weight: dequantize on the gpu once the codes are there
            dequantize(q, view.dtype, out=view)
        self.decode = []
        return self.weights


def compress_group(shape: tuple[int, ...], policy: OffloadPolicy) -> int | None:
    """Group size of FlexGen's compress_weight (4 bits, groups of 64 along dim 0) for a weight of `shape`,
    smaller when dim 0 is not a multiple of 64; None for vectors (norms, biases stay uncompressed, as
    FlexGen's) and when not compressing."""
    if not policy.compress_weight or len(shape) < 2:
        return None
    return next((g for g in (FLEXGEN_GROUP, 32, 16, 8, 4, 2) if shape[0] % g == 0), None)


def plan_bytes(shapes: Shapes, policy: OffloadPolicy, dtype: torch.dtype) -> tuple[dict[Tier, int], int]:
    """(bytes per home tier, staging elements) the layer with `shapes` needs under `policy`."""
    tiers = split_by_size(shapes, policy)
    per_tier = {t: 0 for t in Tier}
    staging = 0
    itemsize = dtype.itemsize
    for name, shape in shapes.items():
        group = compress_group(shape, policy)
        if group is None:
            per_tier[tiers[name]] += math.prod(shape) * itemsize
        else:
            per_tier[tiers[name]] += QuantLayout(bits=FLEXGEN_BITS, group_size=group, dim=0).nbytes(shape, dtype)
        if tiers[name] is not Tier.GPU or group is not None:
            staging = _aligned(staging, itemsize) + math.prod(shape)
    return per_tier, staging


def _aligned(offset: int, itemsize: int) -> int:
    step = max(1, _ALIGN_BYTES // itemsize)
    return -(-offset // step) * step


class ScheduledLayer:
    """A unit with its weights homed in tiers. Protocol: load_weight, load_cache, forward, store_cache."""

    def __init__(self, unit: Unit, weights: Mapping[str, Tensor], policy: OffloadPolicy, memory: Memory,
                 dtype: torch.dtype):
        self.unit, self.memory = unit, memory
        self._screen_norms: Tensor | None = None  # the head's, for a greedy screen: made on first use
        shapes = unit.weight_shapes()
        missing = [k for k in shapes if f"{unit.prefix}.{k}" not in weights]
        if missing:
            raise KeyError(f"weights missing for {unit.prefix}: {missing}")
        tiers = split_by_size(shapes, policy)
        self.homes: dict[str, Tensor | DiskTensor | list] = {}  # a list: a compressed weight's parts
        self.staged: list[_Staged] = []
        offset = 0
        self.groups: dict[str, int] = {}  # compressed weights: their group size
        for name, shape in shapes.items():
            src, label = weights[f"{unit.prefix}.{name}"], f"{unit.prefix}.{name}"
            group = compress_group(shape, policy)
            if group is None:
                self.homes[name] = self._place(tiers[name], shape, dtype, src, label)
            else:
                q = quantize(src.to(device="cpu", dtype=dtype), FLEXGEN_BITS, group, dim=0)
                self.homes[name] = [self._place(tiers[name], t.shape, t.dtype, t, f"{label}.{i}")
                                    for i, t in enumerate((q.data, q.scale, q.mn))]
                self.groups[name] = group
            if tiers[name] is not Tier.GPU or group is not None:
                offset = _aligned(offset, dtype.itemsize)
                self.staged.append(_Staged(name, offset, tuple(shape)))
                offset += math.prod(shape)
        self.staging_numel = offset

    def _place(self, tier: Tier, shape: tuple[int, ...], dtype: torch.dtype, src: Tensor,
               label: str) -> Tensor | DiskTensor:
        # Initial placement is not link traffic of the run (FlexGen loads weights to their homes before
        # timing starts), so it uses the pools' uncounted writes rather than `copy`.
        pool = self.memory.pool(tier)
        home = pool.alloc(shape, dtype, label)
        if isinstance(home, DiskTensor):
            pool.write(home, src.to(device="cpu", dtype=dtype))
        else:
            home.copy_(src)
        return home

    def load_weight(self, slot: Tensor | None, engine: CopyEngine) -> WeightRead:
        """Start copying the non-gpu weights into `slot` (a gpu-pool buffer of >= staging_numel elements)."""
        weights = {n: h for n, h in self.homes.items() if isinstance(h, Tensor) and self.memory.gpu.owns(h)}
        handles, decode = [], []
        for s in self.staged:
            view = slot[s.offset:s.offset + s.numel].view(s.shape)
            weights[s.name] = view
            home = self.homes[s.name]
            if s.name not in self.groups:
                handles.append(engine.submit(view, None, home, None))
                continue
            parts = []  # the codes cross the link (gpu-home codes are read in place)
            for h in home:
                if isinstance(h, Tensor) and self.memory.gpu.owns(h):
                    parts.append(h)
                else:
                    parts.append(torch.empty(h.shape, dtype=h.dtype, device=view.device))
                    handles.append(engine.submit(parts[-1], None, h, None))
            decode.append((view, QTensor(*parts, FLEXGEN_BITS, self.groups[s.name], 0, torch.Size(s.shape))))
        return WeightRead(weights, handles, decode)

    def load_cache(self, state: ForwardState | None) -> None:
        """Start bringing this layer's KV of one GPU batch (a decode step's) to the gpu tier: FlexGen's
        per-sequence split loads it whole, ALISA's token placement the cpu-resident tokens the step
        will read (runner.kv.store.KVStore.prefetch); the plain store needs nothing."""
        store = self._store(state)
        if store is not None:
            store.prefetch(self.unit.layer)

    def store_cache(self, state: ForwardState | None) -> None:
        """Write the new token's KV of one GPU batch back to its home (no-op unless the cache offloads)."""
        store = self._store(state)
        if store is not None:
            store.flush(self.unit.layer)

    def _store(self, state: ForwardState | None) -> KVStore | None:
        if state is None or not isinstance(self.unit, Attention):
            return None
        return cast(KVStore, state.kv)  # the executor's GPU batches attend through KVStores (runner.engines.lm)

    def forward(self, w: dict[str, Tensor], x: Tensor, state: ForwardState) -> Tensor:
        if state.greedy and isinstance(self.unit, Head):
            w = self._screened(w)
        return self.unit.forward(w, x, state)

    def _screened(self, w: dict[str, Tensor]) -> dict[str, Tensor]:
        """The head's weights with a greedy screen (`runner.model.greedy_head`): a bf16 head is its own
        screen, so there is nothing to place; its row-norm maxima are computed once, at the first
        greedy step (every load of the head brings the same values, compressed ones decoded alike)."""
        if w["lm_w"].dtype != torch.bfloat16:
            raise ValueError(f"{self.unit.prefix}: the executor screens a bf16 head only, got {w['lm_w'].dtype}")
        if self._screen_norms is None:
            self._screen_norms = greedy_head.build_screen(w["lm_w"], pack=False)[greedy_head.NORMS]
        return {**w, greedy_head.SCREEN: w["lm_w"], greedy_head.NORMS: self._screen_norms}

    def free(self) -> None:
        """Return every home allocation to its pool (idempotent)."""
        for home in self.homes.values():
            for h in (home if isinstance(home, list) else [home]):
                pool = self.memory.pool(self.memory.tier_of(h))
                if pool.owns(h):
                    pool.free(h)
        self.homes = {}
