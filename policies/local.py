"""`local`: the most recent tokens only (Longformer-style sliding window; ALISA's "local" baseline)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from policies.base import KVPolicy, Selection, register


@register("local")
@dataclass(frozen=True, kw_only=True)
class Local(KVPolicy):
    def select(self, n: int, length: int, scores: Tensor | None, device: torch.device) -> Selection | None:
        m = self.budget(length)
        return None if m >= n else Selection(None, m)
