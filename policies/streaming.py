"""`streaming`: a few first "attention sink" tokens plus the recent window (StreamingLLM)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from policies.base import KVPolicy, Selection, register


@register("streaming")
@dataclass(frozen=True, kw_only=True)
class Streaming(KVPolicy):
    sinks: int = 4  # StreamingLLM's default

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 1:
            raise ValueError(f"kv.sinks: must be at least 1, got {self.sinks}")

    def select(self, n: int, length: int, scores: Tensor | None, device: torch.device) -> Selection | None:
        m = self.budget(length)
        if m >= n:
            return None
        sinks = min(self.sinks, m - 1)  # the newest token is always attended
        return Selection(torch.arange(sinks, device=device), m - sinks)
