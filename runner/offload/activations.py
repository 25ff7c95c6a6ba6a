"""FlexGen's activation placement: each GPU batch's hidden states between layers live on the `cpu` or
`disk` tier (`act_cpu_percent: 100`, or both act percents 0), copied up before the batch's next layer
runs and back after it (FlexGen's `load_hidden` / `store_hidden`). Like FlexGen, one tier holds all of
them: split percentages are refused by the policy.

Each GPU batch owns one flat home buffer sized for its widest pass (the prompt's); a pass's tensors (one
per prefill row group) are packed into it. The executor prefetches the next (layer, batch)'s hidden
states while the current one computes, and only the running and the prefetched ones are on the gpu.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from runner.memory.copy_engine import CopyEngine, Handle
from runner.memory.tiers import Memory, Tier


class ActivationHome:
    def __init__(self, memory: Memory, engine: CopyEngine, tier: Tier, dtype: torch.dtype):
        self.memory, self.engine, self.tier, self.dtype = memory, engine, tier, dtype
        self.homes: list = []
        self.shapes: list[list[torch.Size]] = []
        self.stored: list[list[Handle]] = []
        self.loading: dict[int, tuple[list[Tensor], list[Handle]]] = {}

    def begin_block(self, numels: list[int]) -> None:
        """One home buffer of numels[k] elements per GPU batch k."""
        pool = self.memory.pool(self.tier)
        self.homes = [pool.alloc((n,), self.dtype, f"activations of GPU batch {k}") for k, n in enumerate(numels)]
        self.shapes = [[] for _ in numels]
        self.stored = [[] for _ in numels]
        self.loading = {}

    def store(self, k: int, hidden: list[Tensor]) -> None:
        """Start copying batch k's hidden states (one tensor per row group) to its home."""
        offset, self.shapes[k] = 0, [h.shape for h in hidden]
        for h in hidden:
            n = h.numel()
            self.stored[k].append(self.engine.submit(self.homes[k], (slice(offset, offset + n),), h.reshape(-1), None))
            offset += n

    def prefetch(self, k: int) -> None:
        """Start copying batch k's stored hidden states up to the gpu (no-op if already started)."""
        if k in self.loading or not self.shapes[k]:
            return
        for h in self.stored[k]:  # copies are unordered: the store must land before it is read back
            h.wait()
        self.stored[k] = []
        out, handles, offset = [], [], 0
        for shape in self.shapes[k]:
            n = math.prod(shape)
            dst = torch.empty(n, dtype=self.dtype, device=self.memory.device)
            handles.append(self.engine.submit(dst, None, self.homes[k], (slice(offset, offset + n),)))
            out.append(dst.view(shape))
            offset += n
        self.loading[k] = (out, handles)

    def take(self, k: int) -> list[Tensor]:
        """Batch k's hidden states on the gpu, waiting for the copies."""
        self.prefetch(k)
        out, handles = self.loading.pop(k)
        for h in handles:
            h.wait()
        self.shapes[k] = []
        return out

    def end_block(self) -> None:
        for handles in self.stored:
            for h in handles:
                h.wait()
        for _, handles in self.loading.values():
            for h in handles:
                h.wait()
        pool = self.memory.pool(self.tier)
        for home in self.homes:
            if pool.owns(home):
                pool.free(home)
        self.homes, self.shapes, self.stored, self.loading = [], [], [], {}
