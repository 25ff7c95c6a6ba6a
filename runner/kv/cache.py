"""Preallocated KV storage for one batch on one device.

The cache is written in place (no per-step concatenation): slot j of every row holds
the token at padded column j, so a left-padded batch shares one write position. Sparse
policies read a selection of slots (`gather`) and, when they free KV for good, move the
kept slots to the front (`compact`). `runner.kv.quant.QuantizedKVCache` implements the
same methods over integer storage.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from runner.model.config import ModelConfig
from runner.kv.protocol import KVCacheBase


def flat_rows(index: Tensor, batch: int, kv_heads: int, max_len: int) -> Tensor:
    """Slot selection -> row numbers into a (b * kvh * max_len, ...) view of per-layer storage.

    index: (m,) slots shared by every row, or (b, g, m) with g = 1 (one selection per
    sequence, shared by its kv heads) or g = kvh (one per kv head). Returns (b * kvh * m,).
    """
    if index.dim() == 1:
        index = index.view(1, 1, -1)
    base = torch.arange(batch * kv_heads, device=index.device).view(batch, kv_heads, 1) * max_len
    return (base + index.expand(batch, kv_heads, -1)).reshape(-1)  # (b * kvh * m,)


def take_slots(store: Tensor, index: Tensor, out: Tensor | None = None) -> Tensor:
    """store (b, kvh, cap, w) at slots `index` (see `flat_rows`) -> (b, kvh, m, w), into `out` if given."""
    b, kvh, cap, w = store.shape
    if index.dim() == 1:
        return torch.index_select(store, 2, index) if out is None else torch.index_select(store, 2, index, out=out)
    # One flat row gather: cheaper than torch.gather, which needs an index as big as the output.
    rows = flat_rows(index, b, kvh, cap)
    flat = store.reshape(b * kvh * cap, w)
    if out is None:
        return flat.index_select(0, rows).view(b, kvh, -1, w)
    torch.index_select(flat, 0, rows, out=out.view(-1, w))
    return out


class Scratch:
    """Output buffers reused from call to call, one per key.

    A fresh multi-MB tensor per decode step comes from mmap, and its page faults cost more
    than the copy that fills it (measured: 469 vs 65 ms per step for a batch-16 gather). A
    result lives until the next `take` of the same key: use it before asking again.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def take(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        size = math.prod(shape)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < size or buf.dtype != dtype or buf.device != device:
            # Headroom: a ratio budget grows by a token every few steps; don't regrow each time.
            buf = self._bufs[key] = torch.empty(size + size // 8 + 1, dtype=dtype, device=device)
        return buf[:size].view(shape)


class KVCache(KVCacheBase):
    """Dense per-layer K and V: (b, kvh, max_len, d) each."""

    groupable = True

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.max_len = max_len
        self.scratch = Scratch()  # gather outputs
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]

    def write(self, layer: int, k: Tensor, v: Tensor, start: int) -> None:
        """k, v: (b, kvh, s, d) for slots start..start+s."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise IndexError(f"KV cache overflow: slot {end} > capacity {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v

    def read(self, layer: int, end: int, start: int = 0) -> tuple[Tensor, Tensor]:
        """Views of slots start..end: (b, kvh, end - start, d)."""
        return self.k[layer][:, :, start:end], self.v[layer][:, :, start:end]

    def gather(self, layer: int, index: Tensor) -> tuple[Tensor, Tensor]:
        """The selected slots packed dense: (b, kvh, m, d). See `flat_rows` for index.

        The result lives in `scratch`, reused by the next gather (of any layer): attend over
        it before gathering again.
        """
        b, kvh, _, d = self.k[layer].shape
        shape, like = (b, kvh, index.shape[-1], d), self.k[layer]
        out_k = self.scratch.take("k", shape, like.dtype, like.device)
        out_v = self.scratch.take("v", shape, like.dtype, like.device)
        return take_slots(self.k[layer], index, out_k), take_slots(self.v[layer], index, out_v)

    def take_rows(self, layer: int, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Slots by flat row number into a (b * kvh * max_len, d) view: (r, d) each, copied."""
        d = self.k[layer].shape[-1]
        return self.k[layer].view(-1, d).index_select(0, rows), self.v[layer].view(-1, d).index_select(0, rows)

    def compact(self, layer: int, index: Tensor) -> None:
        """Keep only the selected slots: afterwards slots 0..m-1 hold them, in index order."""
        for store in (self.k[layer], self.v[layer]):
            kept = take_slots(store, index)
            store[:, :, :kept.shape[2]] = kept

    def rows(self, rows: slice) -> "KVCache":
        """A view of some batch rows sharing this cache's storage (writes land here)."""
        view = KVCache.__new__(KVCache)
        view.max_len, view.scratch = self.max_len, Scratch()
        view.k, view.v = [t[rows] for t in self.k], [t[rows] for t in self.v]
        return view

    def select_rows(self, index: Tensor) -> "KVCache":
        """A new cache holding rows `index` (b',) of this one, copied (rows may repeat: forking)."""
        out = KVCache.__new__(KVCache)
        out.max_len, out.scratch = self.max_len, Scratch()
        out.k, out.v = [t[index] for t in self.k], [t[index] for t in self.v]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bytes_per_token(self) -> int:
        """Stored bytes of one token's K and V over all layers (per sequence)."""
        return self.nbytes // (self.k[0].shape[0] * self.max_len)
