"""FlexGen's KV placement: whole sequences of a GPU batch split across tiers by percent, and each
layer's KV brought to the gpu whole before its attention runs (FlexGen `load_cache` /
`store_cache` with `cpu_cache_compute: false`).

Rows 0..g-1 of the batch have their K/V home on `gpu`, the next c rows on `cpu`, the rest on
`disk` (g, c from `cache_gpu_percent` / `cache_cpu_percent`, cumulative rounding like FlexGen's
mixed device). Before a layer's decode attention, `prefetch` copies that layer's K/V of every row
(positions 0..n) into one of two shared gpu working slots; the executor calls it for the next
(layer, GPU batch) while the current one computes. After the attention, `flush` writes the new
token back to the offloaded rows' homes. FlexGen copies the gpu-home rows into the working buffer
too, so attention reads one dense tensor; so does this cache (a copy within the gpu tier).

With `kv.mode: evict` the cache has budget + 1 slots per sequence (the store's capacity), `prefetch`
loads the slots kept so far, and `compact` frees the unselected ones on every tier: the working slot
and each home are gathered within their own tier (the new token is written home first), so evicting
moves no kept token over the link; the step then has nothing left to `flush`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from runner.model.config import ModelConfig
from runner.memory.copy_engine import CopyEngine, Handle
from runner.kv.cache import Scratch, take_slots
from runner.kv.protocol import KVCacheBase, KVTraffic
from runner.kv.quant import FLEXGEN_BITS, QTensor, QuantLayout, dequantize, quantize
from runner.model import ops as M
from runner.memory.tiers import Direction, Memory, Tier


def split_rows(batch: int, gpu_percent: float, cpu_percent: float) -> tuple[int, int, int]:
    """(gpu, cpu, disk) sequence counts of a batch, by cumulative rounding of the percents."""
    g = round(batch * gpu_percent / 100)
    c = round(batch * (gpu_percent + cpu_percent) / 100) - g
    return g, c, batch - g - c


def slots_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of `WorkingSlots` of one layer's K (or V) `shape`: two slots, K and V each."""
    return 4 * math.prod(shape) * dtype.itemsize


def split_bytes(cfg: ModelConfig, split: tuple[int, int, int], max_len: int, dtype: torch.dtype,
                compress: int | None = None) -> dict[Tier, int]:
    """Bytes per tier of a `SequenceSplitKV`'s homes of `split` (gpu, cpu, disk) rows of max_len slots."""
    per_head_token = sum(w * t.itemsize for w, t in _stored(cfg.head_dim, dtype, compress))
    per_seq = 2 * cfg.num_layers * cfg.num_kv_heads * max_len * per_head_token
    return {tier: n * per_seq for n, tier in zip(split, (Tier.GPU, Tier.CPU, Tier.DISK))}


class WorkingSlots:
    """Two gpu buffers holding one layer's K/V of one GPU batch each: the running pair's and the
    prefetched one's. A slot is reused only after the copies that read or write it are done."""

    def __init__(self, memory: Memory, shape: tuple[int, ...], dtype: torch.dtype):
        self.memory = memory
        self.k = [memory.gpu.alloc(shape, dtype, f"kv working slot k{i}") for i in range(2)]
        self.v = [memory.gpu.alloc(shape, dtype, f"kv working slot v{i}") for i in range(2)]
        self.busy: list[list[Handle]] = [[], []]
        self.held = [False, False]  # loaded for a (layer, GPU batch) that has not been flushed yet
        self._next = 0

    def acquire(self) -> int:
        slot, self._next = self._next, 1 - self._next
        if self.held[slot]:  # the schedule keeps at most two (layer, batch) pairs loaded
            raise RuntimeError("KV working slots: both slots are in use (schedule bug)")
        for h in self.busy[slot]:
            h.wait()
        self.busy[slot] = []
        self.held[slot] = True
        return slot

    def free(self) -> None:
        for slot in range(2):
            for h in self.busy[slot]:
                h.wait()
        for t in self.k + self.v:
            if self.memory.gpu.owns(t):
                self.memory.gpu.free(t)
        self.k, self.v = [], []


class SequenceSplitKV(KVCacheBase):
    """KVCache interface over per-tier homes of whole sequences and a shared working slot."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, *, split: tuple[int, int, int],
                 memory: Memory, engine: CopyEngine, slots: WorkingSlots, compress: int | None = None,
                 cpu_compute: bool = False):
        """compress: FlexGen's compress_cache, the group size of 4-bit group-wise storage along the head
        dim (None: the compute dtype). The working slot always holds the dequantized values."""
        self.cfg, self.b, self.max_len, self.dtype, self.split = cfg, batch, max_len, dtype, split
        self.group = compress
        # FlexGen's cpu_cache_compute: the cpu rows' KV stays home, their attention runs there (`attend`).
        self.cpu_compute = cpu_compute
        self.memory, self.engine, self.slots = memory, engine, slots
        kvh, d = cfg.num_kv_heads, cfg.head_dim
        self.parts: list[tuple[slice, Tier]] = []
        first = 0
        for n, tier in zip(split, (Tier.GPU, Tier.CPU, Tier.DISK)):
            if n:
                self.parts.append((slice(first, first + n), tier))
            first += n
        self.homes: list[list[tuple[object, object]]] = []  # [layer][part] -> (k home, v home)
        for j in range(cfg.num_layers):
            layer = []
            for rows, tier in self.parts:
                pool = memory.pool(tier)
                n = rows.stop - rows.start
                layer.append(tuple([pool.alloc((n, kvh, max_len, w), t, f"kv {tier.value} {kv}{j}.{i}")
                                    for i, (w, t) in enumerate(_stored(d, dtype, compress))] for kv in "kv"))
            self.homes.append(layer)
        self.loaded: dict[int, tuple[int, list[Handle]]] = {}  # layer -> (slot, copies in flight)
        self.staged: dict[int, list] = {}  # layer -> compressed parts on the gpu to dequantize into the slot
        self.new: dict[int, tuple[int, tuple[list[Tensor], list[Tensor]]]] = {}  # layer -> new token's (slot, K, V)
        self.writing: dict[int, list[Handle]] = {}  # layer -> writes to its homes still in flight
        self.scratch = Scratch()
        self.traffic = KVTraffic()  # link bytes of the cpu and disk rows (gpu rows cross no link)

    # ---- loading -------------------------------------------------------------------------------
    def prefetch(self, layer: int, n: int) -> None:
        """Start copying positions 0..n of `layer` into a working slot (no-op if already loaded)."""
        if layer in self.loaded:
            return
        for h in self.writing.pop(layer, ()):  # copies are unordered: the homes must hold the last token first
            h.wait()
        slot = self.slots.acquire()
        handles, staged = [], []
        span = (slice(None), slice(None), slice(0, n))
        for (rows, tier), homes in zip(self.parts, self.homes[layer]):
            if self._computed_home(tier):
                continue
            for work, home in zip((self.slots.k[slot], self.slots.v[slot]), homes):
                if self.group is None:
                    dst = (slice(rows.start, rows.stop), slice(None), slice(0, n))
                    handles.append(self.engine.submit(work, dst, home[0], span))
                else:  # the codes cross the link; dequantized into the slot once they are there
                    stage = [torch.empty((rows.stop - rows.start, h.shape[1], n, h.shape[3]), dtype=h.dtype,
                                         device=work.device) for h in home]
                    handles += [self.engine.submit(t, None, h, span) for t, h in zip(stage, home)]
                    staged.append((work, rows, stage))
                if tier is not Tier.GPU:
                    self.traffic.up_bytes += self._bytes(rows, n)
        self.loaded[layer] = (slot, handles)
        self.staged[layer] = staged

    def _slot(self, layer: int, n: int) -> int:
        if layer not in self.loaded:
            self.prefetch(layer, n)
        slot, handles = self.loaded[layer]
        for h in handles:
            h.wait()
        self.loaded[layer] = (slot, [])
        for work, rows, stage in self.staged.pop(layer, ()):
            n = stage[0].shape[2]
            work[rows, :, :n] = self._decode(stage)
        return slot

    def _view(self, layer: int, n: int) -> tuple[Tensor, Tensor]:
        slot = self._slot(layer, n)
        return self.slots.k[slot][:self.b], self.slots.v[slot][:self.b]

    def _computed_home(self, tier: Tier) -> bool:
        return self.cpu_compute and tier is Tier.CPU

    def attend(self, layer: int, q: Tensor, n: int, bias: Tensor | None) -> Tensor:
        """Dense decode attention over positions 0..n (cpu_cache_compute): rows whose KV is on the gpu
        (or was loaded there) against the working slot, cpu rows on the cpu against their home, with only
        their queries and outputs crossing the link. q (b, nh, 1, d); bias (b, 1, 1, n) or None."""
        wk, wv = self._view(layer, n)
        out = torch.empty_like(q)
        for rows, tier in self.parts:
            part_bias = None if bias is None else bias[rows]
            if not self._computed_home(tier):
                out[rows] = M.attention_decode(q[rows], wk[rows, :, :n], wv[rows, :, :n], part_bias)[0]
                continue
            home_k, home_v = (h[0] for h in self.homes[layer][self.parts.index((rows, tier))])
            q_cpu = q[rows].to(home_k.device)
            self.memory.count(Direction.CPU_FROM_GPU, q_cpu.numel() * q_cpu.element_size())
            res = M.attention_decode(q_cpu, home_k[:, :, :n], home_v[:, :, :n],
                                     None if part_bias is None else part_bias.to(home_k.device))[0]
            out[rows] = res.to(q.device)
            self.memory.count(Direction.GPU_FROM_CPU, res.numel() * res.element_size())
        return out

    def _bytes(self, rows: slice, tokens: int) -> int:
        """Stored bytes of K (or V) of `tokens` positions of sequences `rows`."""
        per = sum(w * t.itemsize for w, t in _stored(self.cfg.head_dim, self.dtype, self.group))
        return (rows.stop - rows.start) * self.cfg.num_kv_heads * tokens * per

    def _encode(self, x: Tensor) -> list[Tensor]:
        """x (b, kvh, s, d) as stored: itself, or 4-bit codes with their group scales and minimums."""
        if self.group is None:
            return [x]
        q = quantize(x, FLEXGEN_BITS, self.group, dim=3)
        return [q.data, q.scale, q.mn]

    def _decode(self, parts: list[Tensor]) -> Tensor:
        data, scale, mn = parts
        shape = torch.Size((*data.shape[:3], self.cfg.head_dim))
        return dequantize(QTensor(data, scale, mn, FLEXGEN_BITS, self.group, 3, shape), self.dtype)

    # ---- KVCache interface ---------------------------------------------------------------------
    def write(self, layer: int, k: Tensor, v: Tensor, start: int) -> None:
        end = start + k.shape[2]
        if end > self.max_len:
            raise IndexError(f"KV cache overflow: slot {end} > capacity {self.max_len}")
        stored = self._encode(k), self._encode(v)
        if start == 0:  # the prompt: straight to the homes (prefill attention uses k, v directly)
            pos = (slice(None), slice(None), slice(0, end))
            for (rows, tier), homes in zip(self.parts, self.homes[layer]):
                for home, parts in zip(homes, stored):
                    for h, x in zip(home, parts):
                        self.writing.setdefault(layer, []).append(self.engine.submit(h, pos, x, (rows,)))
                    if tier is not Tier.GPU:
                        self.traffic.down_bytes += self._bytes(rows, end)
            return
        if self.cpu_compute:  # the new token goes straight home for the cpu rows: their attention reads it there
            pos = (slice(None), slice(None), slice(start, end))
            for (rows, tier), homes in zip(self.parts, self.homes[layer]):
                if self._computed_home(tier):
                    for home, parts in zip(homes, stored):
                        self.engine.submit(home[0], pos, parts[0], (rows,)).wait()
                    self.traffic.down_bytes += self._bytes(rows, end - start)
        wk, wv = self._view(layer, start)
        # Compressed: attention sees the new token as it will be read back, as the plain quantized cache does.
        wk[:, :, start:end] = k if self.group is None else self._decode(stored[0])
        wv[:, :, start:end] = v if self.group is None else self._decode(stored[1])
        self.new[layer] = start, stored

    def flush(self, layer: int, start: int, end: int) -> None:
        """Write slots start..end of the layer (the new token's, as `write` stored it) back to the homes,
        release the working slot. After an evict step's `compact` the homes hold it already (start == end)."""
        slot, _ = self.loaded.pop(layer)
        self.slots.held[slot] = False
        pending = self.new.pop(layer, None)
        if start == end:
            return
        if pending is None or pending[0] != start:
            raise RuntimeError(f"KV flush of slots {start}..{end}: not the slots the step wrote (schedule bug)")
        self.writing.setdefault(layer, []).extend(self._write_home(layer, pending[1], start, end))

    def _write_home(self, layer: int, stored: tuple[list[Tensor], list[Tensor]], start: int,
                    end: int) -> list[Handle]:
        """Start writing the stored K, V of slots start..end to every home not written at `write`."""
        pos = (slice(None), slice(None), slice(start, end))
        handles = []
        for (rows, tier), homes in zip(self.parts, self.homes[layer]):
            if self._computed_home(tier):
                continue  # written at `write`
            for home, parts in zip(homes, stored):
                for h, x in zip(home, parts):
                    # x is the new token's own tensor (not the slot), so the slot is free once released.
                    handles.append(self.engine.submit(h, pos, x, (rows,)))
                if tier is not Tier.GPU:
                    self.traffic.down_bytes += self._bytes(rows, end - start)
        return handles

    def compact(self, layer: int, index: Tensor) -> None:
        """Keep only the selected slots (kv.mode: evict) on every tier: the working slot (what attention
        reads) in place, and each home by a gather within its own tier, so kept tokens never cross the link
        again. The step's new token goes home first (the gather reads it there), so `flush` has nothing
        left to write. index (m,) or (b, g, m) over slots 0..n, the new token's slot being n - 1."""
        slot, stored = self.new.pop(layer)
        wk, wv = self._view(layer, slot + 1)
        for h in self._write_home(layer, stored, slot, slot + 1):
            h.wait()  # copies are unordered: the gather below must read the new token
        for h in self.writing.pop(layer, ()):
            h.wait()
        kept = (slice(None), slice(None), slice(0, index.shape[-1]))
        handles = self.writing.setdefault(layer, [])  # the next prefetch of the layer waits for them
        for (rows, _), homes in zip(self.parts, self.homes[layer]):
            src = _home_index(index, rows, self.cfg.num_kv_heads)
            handles += [self.engine.submit(h, kept, h, src) for home in homes for h in home]
        for work in (wk, wv):  # (b, kvh, cap, d)
            work[:, :, :index.shape[-1]] = take_slots(work, index)

    def read(self, layer: int, end: int, start: int = 0) -> tuple[Tensor, Tensor]:
        wk, wv = self._view(layer, end)
        return wk[:, :, start:end], wv[:, :, start:end]

    def gather(self, layer: int, index: Tensor) -> tuple[Tensor, Tensor]:
        """The selected slots packed dense: (b, kvh, m, d), in this cache's scratch (see KVCache.gather)."""
        wk, wv = self._view(layer, self.max_len)
        b, kvh, _, d = wk.shape
        shape = (b, kvh, index.shape[-1], d)
        out_k = self.scratch.take("k", shape, wk.dtype, wk.device)
        out_v = self.scratch.take("v", shape, wv.dtype, wv.device)
        return take_slots(wk, index, out_k), take_slots(wv, index, out_v)

    def take_rows(self, layer: int, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Slots by flat row number into (b * kvh * max_len, d); the working slot is longer, so remap."""
        wk, wv = self._view(layer, self.max_len)
        d, cap = wk.shape[-1], wk.shape[2]
        rows = rows // self.max_len * cap + rows % self.max_len
        return wk.reshape(-1, d).index_select(0, rows), wv.reshape(-1, d).index_select(0, rows)

    def rows(self, rows: slice) -> SequenceSplitKV:
        if rows.indices(self.b) != (0, self.b, 1):
            raise NotImplementedError("sequence-split KV is written for the whole GPU batch at once")
        return self

    @property
    def nbytes(self) -> int:
        return sum(split_bytes(self.cfg, self.split, self.max_len, self.dtype).values())

    def bytes_per_token(self) -> int:
        return self.cfg.kv_bytes_per_token(self.dtype.itemsize)

    def free(self) -> None:
        for layer, (slot, handles) in list(self.loaded.items()):
            for h in handles:
                h.wait()
            self.slots.held[slot] = False
        for handles in self.writing.values():
            for h in handles:
                h.wait()
        self.loaded, self.staged, self.new, self.writing = {}, {}, {}, {}
        self.engine.sync()
        for layer in self.homes:
            for (_, tier), homes in zip(self.parts, layer):
                pool = self.memory.pool(tier)
                for h in (t for home in homes for t in home):
                    if pool.owns(h):
                        pool.free(h)
        self.homes = []


def _home_index(index: Tensor, rows: slice, kv_heads: int) -> tuple:
    """A slot selection (m,) or (b, g, m) (see `flat_rows`) as an index that picks (r, kvh, m, w) out of
    the home (r, kvh, cap, w) of batch rows `rows`."""
    if index.dim() == 1:
        return slice(None), slice(None), index
    part = index[rows]  # (r, g, m), g = 1 or kvh
    r, m = part.shape[0], part.shape[-1]
    return (torch.arange(r, device=part.device)[:, None, None],
            torch.arange(kv_heads, device=part.device)[None, :, None], part.expand(r, kv_heads, m))


def _stored(head_dim: int, dtype: torch.dtype, group: int | None) -> list[tuple[int, torch.dtype]]:
    """(last dim, dtype) of each tensor one head's K (or V) is stored as: the values, or FlexGen's
    compress_cache format (4-bit codes two per byte, one scale and one minimum per group)."""
    if group is None:
        return [(head_dim, dtype)]
    return [(s[-1], t) for s, t in QuantLayout(bits=FLEXGEN_BITS, group_size=group, dim=-1).parts((head_dim,), dtype)]
