"""Preallocated KV storage for one batch on one device.

The cache is written in place (no per-step concatenation): slot j of every row holds
the token at padded column j, so a left-padded batch shares one write position.
"""
from __future__ import annotations

import torch
from torch import Tensor

from runner.config import ModelConfig


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

    def rows(self, rows: slice) -> "KVCache":
        """A view of some batch rows sharing this cache's storage (writes land here)."""
        view = KVCache.__new__(KVCache)
        view.max_len = self.max_len
        view.k, view.v = [t[rows] for t in self.k], [t[rows] for t in self.v]
        return view

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
