"""Preallocated KV storage for one batch on one device.

The cache is written in place (no per-step concatenation): slot j of every row holds
the token at padded column j, so a left-padded batch shares one write position. Sparse
policies read a selection of slots (`gather`) and, when they free KV for good, move the
kept slots to the front (`compact`). `runner.kv_quant.QuantizedKVCache` implements the
same methods over integer storage.
"""
from __future__ import annotations

import torch
from torch import Tensor

from runner.config import ModelConfig


def flat_rows(index: Tensor, batch: int, kv_heads: int, max_len: int) -> Tensor:
    """Slot selection -> row numbers into a (b * kvh * max_len, ...) view of per-layer storage.

    index: (m,) slots shared by every row, or (b, g, m) with g = 1 (one selection per
    sequence, shared by its kv heads) or g = kvh (one per kv head). Returns (b * kvh * m,).
    """
    if index.dim() == 1:
        index = index.view(1, 1, -1)
    base = torch.arange(batch * kv_heads, device=index.device).view(batch, kv_heads, 1) * max_len
    return (base + index.expand(batch, kv_heads, -1)).reshape(-1)  # (b * kvh * m,)


class KVCache:
    """Dense per-layer K and V: (b, kvh, max_len, d) each."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.max_len = max_len
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]

    def write(self, layer: int, k: Tensor, v: Tensor, start: int) -> None:
        """k, v: (b, kvh, s, d) for slots start..start+s."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise IndexError(f"KV cache overflow: slot {end} > capacity {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v

    def read(self, layer: int, end: int) -> tuple[Tensor, Tensor]:
        """Views of slots 0..end: (b, kvh, end, d)."""
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def gather(self, layer: int, index: Tensor) -> tuple[Tensor, Tensor]:
        """Copies of the selected slots, packed dense: (b, kvh, m, d). See `flat_rows` for index."""
        return self._take(self.k[layer], index), self._take(self.v[layer], index)

    def compact(self, layer: int, index: Tensor) -> None:
        """Keep only the selected slots: afterwards slots 0..m-1 hold them, in index order."""
        for store in (self.k[layer], self.v[layer]):
            kept = self._take(store, index)
            store[:, :, :kept.shape[2]] = kept

    @staticmethod
    def _take(store: Tensor, index: Tensor) -> Tensor:
        b, kvh, cap, d = store.shape
        if index.dim() == 1:
            return store.index_select(2, index)
        # One flat row gather: cheaper than torch.gather, which needs an index as big as the output.
        rows = flat_rows(index, b, kvh, cap)
        return store.view(b * kvh * cap, d).index_select(0, rows).view(b, kvh, -1, d)

    def rows(self, rows: slice) -> "KVCache":
        """A view of some batch rows sharing this cache's storage (writes land here)."""
        view = KVCache.__new__(KVCache)
        view.max_len = self.max_len
        view.k, view.v = [t[rows] for t in self.k], [t[rows] for t in self.v]
        return view

    def select_rows(self, index: Tensor) -> "KVCache":
        """A new cache holding rows `index` (b',) of this one, copied (rows may repeat: forking)."""
        out = KVCache.__new__(KVCache)
        out.max_len = self.max_len
        out.k, out.v = [t[index] for t in self.k], [t[index] for t in self.v]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bytes_per_token(self) -> int:
        """Stored bytes of one token's K and V over all layers (per sequence)."""
        return self.nbytes // (self.k[0].shape[0] * self.max_len)
