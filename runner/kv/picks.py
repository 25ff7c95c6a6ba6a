"""Per-layer buffers of the picked older KV, updated incrementally from step to step.

A scoring policy (SWA, H2O) re-selects its k older tokens at every decode step, but the
set barely moves: on SmolLM2 over Austen text at 80% sparsity about 0.5% of SWA's picks
are new per step (one token leaving the recent window, roughly). Gathering all k picks
again each step copies ~10% of the KV per step; a `PickBuffer` keeps last step's picks
packed dense and copies in only the new ones, into the slots of the dropped ones. Slot
order inside the buffer is arbitrary (attention does not care), so `pos` records which
position each slot holds. The same move, only the changed picks, is what the offloading
executor sends over the CPU -> GPU link. A buffer may also hold the recent run beside the
picks (`recent`): then each step copies in the newest token too, and attention reads one
dense buffer (`runner.kv.store.KVStore.pack_recent`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from policies.base import Selection
from runner.kv.protocol import KVCacheBase
from runner.model.config import ModelConfig

# Above this share of changed picks a full gather is cheaper than the bookkeeping.
_REBUILD_SHARE = 0.5


def capacity(m: int) -> int:
    """Slots allocated for m picks: ratio budgets grow a token every few steps, so leave room."""
    return m + m // 8 + 8


def buffer_bytes(batch: int, kv_heads: int, groups: int, head_dim: int, m: int, dtype: torch.dtype) -> int:
    """Bytes one layer's PickBuffer holds for at most m picks (K, V and int64 positions)."""
    cap = capacity(m)
    return 2 * batch * kv_heads * cap * head_dim * dtype.itemsize + batch * groups * cap * 8


def layers_bytes(cfg: ModelConfig, per_head: bool, batch: int, m: int, layers: int, dtype: torch.dtype) -> int:
    """Bytes of `layers` layers' picks of at most m each: one set of picks per kv head (`per_head`
    scoring) or one per row shared by its heads."""
    groups = cfg.num_kv_heads if per_head else 1
    return layers * buffer_bytes(batch, cfg.num_kv_heads, groups, cfg.head_dim, m, dtype)


class PickBuffer:
    """One layer's picks: k, v (b, kvh, cap, d) with slots 0..count valid; pos (b, g, cap)."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.pos: Tensor | None = None
        self.count = 0
        self.copied = 0  # slots (per kv head) copied in since creation: what the buffer saves

    @property
    def nbytes(self) -> int:
        if self.k is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos))

    def update(self, cache: KVCacheBase, layer: int, picks: Tensor, n: int,
               recent: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Hold exactly `picks` (b, g, k), unique positions < n - recent, plus the `recent` newest
        positions n - recent..n, of `cache` layer `layer`: m = k + recent slots.

        Returns views (k (b, kvh, m, d), v, pos (b, g, m)) valid until the next update.
        """
        b, g, k = picks.shape
        m = k + recent
        if self.pos is None or self.pos.shape[:2] != (b, g) or not self.count <= m <= self.pos.shape[2]:
            return self._rebuild(cache, layer, Selection(picks, recent).index(n, picks.device))
        wanted = torch.zeros((b, g, n), dtype=torch.bool, device=picks.device).scatter_(-1, picks, True)
        wanted[..., n - recent:] = True
        old = self.pos[..., :self.count]  # (b, g, count)
        held = torch.zeros_like(wanted).scatter_(-1, old, True)
        incoming = (wanted & ~held).nonzero()  # (i, 3): row, group, position; sorted by (row, group)
        if incoming.shape[0] > _REBUILD_SHARE * b * g * m:
            return self._rebuild(cache, layer, Selection(picks, recent).index(n, picks.device))
        if incoming.shape[0]:
            free = self._free_slots(wanted.gather(-1, old), m)  # (i, 3): row, group, slot; same order
            self._copy_in(cache, layer, incoming, free[:, 2])
        self.count = m
        return self.k[:, :, :m], self.v[:, :, :m], self.pos[..., :m]

    def _free_slots(self, still_wanted: Tensor, m: int) -> Tensor:
        """Slots of dropped picks plus the new slots count..m, sorted by (row, group): per
        (row, group) there are exactly as many as incoming picks (m = kept + incoming).
        One mask over slots 0..m, so nonzero's row-major order is already the order wanted."""
        b, g, _ = still_wanted.shape
        grown = torch.ones((b, g, m - self.count), dtype=torch.bool, device=still_wanted.device)
        return torch.cat((~still_wanted, grown), dim=-1).nonzero()  # (f, 3): row, group, slot

    def _copy_in(self, cache: KVCacheBase, layer: int, incoming: Tensor, slots: Tensor) -> None:
        row, grp, pos = incoming.unbind(1)
        b, kvh, cap, d = self.k.shape
        if self.pos.shape[1] == 1 and kvh > 1:  # one pick serves every kv head of its row
            heads = torch.arange(kvh, device=pos.device)
            src_head = (row[:, None] * kvh + heads).reshape(-1)  # (i * kvh,)
            pos_r, slot_r = pos.repeat_interleave(kvh), slots.repeat_interleave(kvh)
        else:
            src_head, pos_r, slot_r = row * kvh + grp, pos, slots
        k_rows, v_rows = cache.take_rows(layer, src_head * cache.max_len + pos_r)  # (r, d) each
        dst = src_head * cap + slot_r
        self.k.view(-1, d).index_copy_(0, dst, k_rows)
        self.v.view(-1, d).index_copy_(0, dst, v_rows)
        self.pos.view(-1)[(row * self.pos.shape[1] + grp) * cap + slots] = pos
        self.copied += incoming.shape[0]

    def _rebuild(self, cache: KVCacheBase, layer: int, picks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, g, m = picks.shape
        cap = capacity(m)
        k, v = cache.gather(layer, picks)  # (b, kvh, m, d) in the cache's scratch
        if self.k is None or self.k.shape[2] < m or self.k.shape[:2] != k.shape[:2] or self.pos.shape[1] != g:
            self.k = torch.empty((*k.shape[:2], cap, k.shape[3]), dtype=k.dtype, device=k.device)
            self.v = torch.empty_like(self.k)
            self.pos = torch.empty((b, g, cap), dtype=picks.dtype, device=picks.device)
        self.k[:, :, :m] = k
        self.v[:, :, :m] = v
        self.pos[..., :m] = picks
        self.count = m
        self.copied += picks.numel()
        return self.k[:, :, :m], self.v[:, :, :m], self.pos[..., :m]

