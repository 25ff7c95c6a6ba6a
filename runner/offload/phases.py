"""ALISA's three KV phases as pure functions of the sequence length (ISCA'24 §V-A): which positions
live on the gpu, which are recomputed, and the window, cpu home and activation sizes that follow; shared by the
token-tiered cache (runner/offload/token_kv.py), its memory plan and the cost model."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from runner.offload.policy import OffloadPolicy


@dataclass(frozen=True, kw_only=True)
class TokenPhases:
    """Phase switch lengths and the shares of tokens offloaded to cpu and recomputed."""
    p1: int
    p2: int
    offload_ratio: float
    recompute_ratio: float
    chunk: int = 16  # tokens moved gpu -> cpu together (fewer, larger copies)

    def __post_init__(self) -> None:
        if not 0 < self.p1 <= self.p2:
            raise ValueError(f"offload.p1, offload.p2: need 0 < p1 <= p2, got {self.p1}, {self.p2}")
        if not 0 <= self.recompute_ratio <= self.offload_ratio < 1:
            raise ValueError("offload.recompute_ratio, offload.offload_ratio: need 0 <= recompute_ratio <= "
                             f"offload_ratio < 1, got {self.recompute_ratio:g}, {self.offload_ratio:g}")

    @classmethod
    def of(cls, policy: OffloadPolicy) -> TokenPhases:
        """The phases an offload policy states (offload.p1, p2, offload_ratio, recompute_ratio)."""
        return cls(p1=policy.p1, p2=policy.p2, offload_ratio=policy.offload_ratio,
                   recompute_ratio=policy.recompute_ratio)

    def gpu_from(self, n: int) -> int:
        """First position whose K/V is on the gpu tier at length n."""
        if n < self.p1:
            return 0
        return int(self.offload_ratio * n) // self.chunk * self.chunk

    def recompute_below(self, n: int) -> int:
        """Positions below this are recomputed (their K/V deleted) at length n."""
        return 0 if n < self.p2 else min(int(self.recompute_ratio * n), self.gpu_from(n))

    def phase(self, n: int) -> int:
        return 1 if n < self.p1 else 2 if n < self.p2 else 3

    # Over many lengths at once (the cost model's decode steps): the scalar functions above, per length.
    def gpu_from_each(self, lengths: np.ndarray) -> np.ndarray:
        return np.array([self.gpu_from(int(n)) for n in lengths], dtype=float)

    def recompute_below_each(self, lengths: np.ndarray) -> np.ndarray:
        return np.array([self.recompute_below(int(n)) for n in lengths], dtype=float)

    def phase_each(self, lengths: np.ndarray) -> np.ndarray:
        return np.array([self.phase(int(n)) for n in lengths], dtype=int)

    # Cached: the plan search sizes caches for thousands of candidate phases, each a scan over lengths.
    @functools.lru_cache(maxsize=1 << 14)
    def window(self, max_len: int, min_len: int = 1) -> int:
        """Gpu window slots: the most tokens on gpu at once at lengths min_len..max_len (min_len: the
        prompt, written first), plus a chunk of slack for sliding."""
        return min(max_len, max(n - self.gpu_from(n) for n in range(min_len, max_len + 1)) + self.chunk)

    @functools.lru_cache(maxsize=1 << 14)
    def cpu_span(self, max_len: int, min_len: int = 1) -> int:
        """Cpu home slots: the most positions cpu-resident at once (offloaded and not yet deleted by
        phase III, `recompute_below(n)..gpu_from(n)`) at lengths min_len..max_len. Both ends only grow
        with n, so a ring of this many slots (position p in slot p % span) holds every live one."""
        return max((self.gpu_from(n) - self.recompute_below(n) for n in range(min_len, max_len + 1)), default=0)

    @functools.lru_cache(maxsize=1 << 14)
    def recompute_span(self, max_len: int) -> int:
        """Positions whose layer inputs are kept: the most recomputed at any length up to max_len."""
        return min(max_len, max((self.recompute_below(n) for n in range(1, max_len + 1)), default=0))

