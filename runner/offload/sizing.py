"""The bytes each tier must hold for the block executor's plan, as pure functions of the model,
policy and batch shape: the executor checks its budgets with them before it allocates anything,
and the cost model (`runner.plan.cost_model`) predicts peak memory with the same functions, so a plan
the search finds fits exactly when the executor would accept it.
"""
from __future__ import annotations

import collections
import functools
from dataclasses import dataclass
from typing import Protocol

import torch

from runner.model import ops as M
from runner.model.config import ModelConfig, Positions
from runner.kv.picks import layers_bytes
from runner.kv.quant import flexgen_cache_layout
from runner.kv.spec import KVMode, KVSettings, QuantAxis
from runner.kv.store import kv_bytes, kv_capacity
from runner.model.layers import build_units
from runner.memory.tiers import Tier
from runner.offload.phases import TokenPhases
from runner.offload.scheduled import plan_bytes
from runner.offload.sequence_kv import slots_bytes, split_bytes, split_rows
from runner.offload.token_kv import tiered_bytes
from runner.offload.policy import KVPlacement, OffloadPolicy

SLOTS = 2  # weight staging slots: the running layer's and the prefetched one's (double buffering)
Need = dict[Tier, dict[str, int]]  # bytes per tier, by the part of the plan that needs them


def weight_need(cfg: ModelConfig, policy: OffloadPolicy, dtype: torch.dtype) -> tuple[Need, int]:
    """Weights in their home tiers, the staging slots and the rotary tables; also the staging slot
    size (elements): the largest unit's bytes that arrive from off the gpu."""
    parts, staging = _weight_need(cfg, policy.w_gpu_percent, policy.w_cpu_percent, policy.compress_weight, dtype)
    need: Need = {t: {} for t in Tier}
    for tier, label, n in parts:
        need[tier][label] = n
    return need, staging


@functools.lru_cache(maxsize=4096)  # the plan search asks again and again for the same placements
def _weight_need(cfg: ModelConfig, w_gpu: float, w_cpu: float, compress: bool, dtype: torch.dtype
                 ) -> tuple[tuple[tuple[Tier, str, int], ...], int]:
    policy = OffloadPolicy(w_gpu_percent=w_gpu, w_cpu_percent=w_cpu, compress_weight=compress)
    need: Need = {t: {} for t in Tier}
    staging = 0
    seen: dict[tuple, tuple[dict[Tier, int], int]] = {}  # the layers repeat a few unit shapes
    for u in build_units(cfg):
        shapes = u.weight_shapes()
        key = tuple(shapes.items())
        if key not in seen:
            seen[key] = plan_bytes(shapes, policy, dtype)
        per_tier, numel = seen[key]
        for t, n in per_tier.items():
            need[t][f"{t.value} weights"] = need[t].get(f"{t.value} weights", 0) + n
        staging = max(staging, numel)
    need[Tier.GPU][f"{SLOTS} weight staging slots"] = SLOTS * staging * dtype.itemsize
    if cfg.arch.positions is Positions.ROPE:
        need[Tier.GPU]["rotary tables"] = 2 * cfg.max_seq_len * cfg.head_dim * dtype.itemsize
    return tuple((t, label, n) for t in Tier for label, n in need[t].items()), staging


def rope_tables(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...] | None:
    if cfg.arch.positions is not Positions.ROPE:
        return None
    return M.rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, dtype, device)


@dataclass(frozen=True, kw_only=True)
class KVSizing:
    """Where a plan keeps its KV and the bytes that takes per tier, from the model, the offload policy
    and the KV settings alone: the executor's `KVPlacer` plans and builds its caches with it, the
    planner sizes plans with it (no memory, no copies)."""
    cfg: ModelConfig
    policy: OffloadPolicy
    kv: KVSettings
    dtype: torch.dtype

    def __post_init__(self) -> None:
        _ = self.phases  # built first, as the executor always did: bad phase settings raise before the rest
        self._check()

    @functools.cached_property
    def phases(self) -> TokenPhases | None:
        """ALISA's token phases under token placement, else None."""
        return TokenPhases.of(self.policy) if self.policy.kv_placement is KVPlacement.TOKEN else None

    @property
    def split(self) -> bool:
        """FlexGen's per-sequence split (some rows off the gpu, or compressed)."""
        p = self.policy
        return p.kv_placement is KVPlacement.SEQUENCE and (p.cache_gpu_percent < 100 or p.compress_cache)

    @property
    def compress(self) -> int | None:
        """FlexGen's compress_cache group size, or None when the cache keeps the compute dtype."""
        return flexgen_cache_layout(self.cfg.head_dim).group_size if self.policy.compress_cache else None

    @property
    def offloaded(self) -> bool:
        return bool(self.split or self.phases)

    def _check(self) -> None:
        if self.policy.cpu_cache_compute and (self.kv.policy.name != "dense" or self.compress is not None):
            raise ValueError("offload.cpu_cache_compute: attention on the cpu rows' home runs dense over "
                             "uncompressed KV; use kv.policy: dense and compress_cache: false")
        if not self.offloaded:
            return
        if self.kv.mode is KVMode.EVICT and self.phases:
            raise ValueError("kv.mode: evict compacts slots, which token placement (offload.kv_placement: token) "
                             "cannot do: its tiers hold tokens by position; use kv_placement: sequence or mode: retain")
        if self.kv.mode is KVMode.EVICT and self.policy.cpu_cache_compute:
            raise ValueError("offload.cpu_cache_compute: attention by tier runs over positions, not evict's "
                             "compacted slots; use kv.mode: retain")
        if self.split and self.kv.bits != 16:
            raise ValueError("kv.bits: FlexGen's per-sequence split stores the compute dtype, or 4 bits with "
                             "offload.compress_cache; use kv_placement: token for INT8 KV on cpu")
        if self.phases and self.kv.bits != 16 and self.kv.quant_axis is not QuantAxis.HIDDEN:
            raise ValueError("kv.quant_axis: token placement fetches single tokens; use hidden")

    def plan(self, shapes: list[tuple[int, int]], max_new: int) -> Need:
        """Bytes per tier and part for GPU batches of (rows, max_len) each, max_new of them generated."""
        need: Need = {t: {} for t in Tier}
        per_shape: dict[tuple[int, int], list[tuple[Tier, str, int]]] = {}  # GPU batches mostly share one shape
        for k, (b, n) in enumerate(shapes):
            if (b, n) not in per_shape:
                per_shape[b, n] = self._plan_one(b, n, max_new)
            for tier, part, nbytes in per_shape[b, n]:
                need[tier][part.format(k=k)] = nbytes
        if self.split:
            need[Tier.GPU]["2 KV working slots"] = slots_bytes(self.slot_shape(shapes), self.dtype)
        return need

    def plan_totals(self, shapes: list[tuple[int, int]], max_new: int) -> dict[Tier, int]:
        """`plan` summed per tier, each distinct shape planned once (the plan search asks this for
        thousands of plans and needs no part names)."""
        out = {t: 0 for t in Tier}
        for (b, n), count in collections.Counter(shapes).items():
            for tier, _, nbytes in self._plan_one(b, n, max_new):
                out[tier] += count * nbytes
        if self.split:
            out[Tier.GPU] += slots_bytes(self.slot_shape(shapes), self.dtype)
        return out

    def _plan_one(self, b: int, n: int, max_new: int) -> list[tuple[Tier, str, int]]:
        """(tier, part name with a {k} for the GPU batch, bytes) of one GPU batch of b rows and n slots."""
        c, kv = self.cfg, self.kv
        if self.phases:
            gpu, cpu = tiered_bytes(c, b, n, self.dtype, self.phases, kv.bits, kv.group_size, min_len=n - max_new)
            out = [(Tier.GPU, "KV window and activations of GPU batch {k}", gpu),
                   (Tier.CPU, "KV home of GPU batch {k}", cpu)]
        elif self.split:
            split = split_rows(b, self.policy.cache_gpu_percent, self.policy.cache_cpu_percent)
            out = [(tier, f"KV of GPU batch {{k}} ({tier.value} rows)", nbytes)
                   for tier, nbytes in split_bytes(c, split, kv_capacity(kv, n), self.dtype, self.compress).items()]
        else:
            return [(Tier.GPU, "KV cache of GPU batch {k}", kv_bytes(c, kv, b, n, self.dtype))]
        return out + [(Tier.GPU, "SWA picks of GPU batch {k}", self._picks_bytes(b, n))]

    def _picks_bytes(self, b: int, n: int) -> int:
        scoring = self.kv.policy.scoring
        if scoring is None or self.kv.mode is KVMode.EVICT:  # evict attends over its compacted slots
            return 0
        m = self.kv.policy.split(n)[1]
        # Without buffers: a layer's gather while it attends, and the next one's, fetched ahead (fetch_ahead).
        layers = self.cfg.num_layers if self.policy.pick_buffer else min(2, self.cfg.num_layers)
        return layers_bytes(self.cfg, scoring.per_head, b, m, layers, self.dtype)

    def slot_shape(self, shapes: list[tuple[int, int]]) -> tuple[int, int, int, int]:
        """(b, kvh, n, d) of the split cache's working slots: the largest GPU batch at its most slots (all
        positions, or evict mode's budget + 1)."""
        n = max(kv_capacity(self.kv, n) for _, n in shapes)
        return (max(b for b, _ in shapes), self.cfg.num_kv_heads, n, self.cfg.head_dim)


class KVPlanner(Protocol):
    """What block_need asks of the KV side: `KVSizing`, or the executor's `KVPlacer` (which asks it)."""

    def plan(self, shapes: list[tuple[int, int]], max_new: int) -> Need: ...


def block_need(cfg: ModelConfig, kv_plan: KVPlanner, act_tier: Tier, shapes: list[tuple[int, int]], max_new: int,
               dtype: torch.dtype) -> Need:
    """A block's KV (every tier), hidden states and logits, for GPU batches of (rows, max_len)."""
    itemsize = dtype.itemsize
    need = kv_plan.plan(shapes, max_new)
    acts = activation_elems(cfg, shapes, max_new)
    logits = [rows * cfg.vocab_size * itemsize for rows, _ in shapes]
    if act_tier is Tier.GPU:
        for k, n in enumerate(acts):
            need[Tier.GPU][f"activations of GPU batch {k}"] = n * itemsize + logits[k]
    else:  # homes on the act tier; on the gpu the running and the prefetched batch's, and the logits
        for k, n in enumerate(acts):
            need[act_tier][f"activations of GPU batch {k}"] = n * itemsize
        need[Tier.GPU]["activations of 2 GPU batches"] = 2 * max(acts) * itemsize
        need[Tier.GPU]["logits"] = sum(logits)
    return need


def activation_elems(cfg: ModelConfig, shapes: list[tuple[int, int]], max_new: int) -> list[int]:
    """Elements of each GPU batch's hidden states at their largest: the prompt's pass."""
    return [rows * (length - max_new) * max(cfg.hidden_size, cfg.embed_dim) for rows, length in shapes]


def plan_need(cfg: ModelConfig, policy: OffloadPolicy, kv: KVSettings, dtype: torch.dtype, *, gpu_batch_size: int,
              num_gpu_batches: int, prompt_len: int, gen_len: int) -> dict[Tier, int]:
    """Peak bytes per tier of the executor's run of full blocks of equal-length prompts: `block_need`
    summed without its part names (for k equal GPU batches, each per-batch part counts k times)."""
    weights, _ = weight_need(cfg, policy, dtype)
    k, n = num_gpu_batches, prompt_len + gen_len
    out = KVSizing(cfg=cfg, policy=policy, kv=kv, dtype=dtype).plan_totals([(gpu_batch_size, n)] * k, gen_len)
    acts = activation_elems(cfg, [(gpu_batch_size, n)], gen_len)[0] * dtype.itemsize
    logits = gpu_batch_size * cfg.vocab_size * dtype.itemsize
    if policy.act_tier is Tier.GPU:
        out[Tier.GPU] += k * (acts + logits)
    else:
        out[policy.act_tier] += k * acts
        out[Tier.GPU] += 2 * acts + k * logits
    return {t: sum(weights[t].values()) + out[t] for t in Tier}
