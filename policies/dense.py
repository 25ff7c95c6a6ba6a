"""`dense`: attend to every cached token (the reference every sparse policy is judged against)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from policies.base import KVPolicy, register


@register("dense")
@dataclass(frozen=True, kw_only=True)
class Dense(KVPolicy):
    def select(self, layer: int, length: int) -> Tensor | None:
        return None
