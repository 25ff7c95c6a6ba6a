"""`dense`: attend to every cached token (the reference every sparse policy is judged against)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from policies.base import KVPolicy, Selection, register


@register("dense")
@dataclass(frozen=True, kw_only=True)
class Dense(KVPolicy):
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity or self.budget_tokens is not None:
            raise ValueError("kv.policy: dense keeps every token; remove kv.sparsity / kv.budget_tokens")

    def select(self, n: int, length: int, scores: Tensor | None, device: torch.device) -> Selection | None:
        return None
