"""`strided`: a recent window plus every s-th older token (Sparse Transformer's strided pattern).

Half the budget is the recent window; the other half is spread evenly over the older
tokens, counting back from the window's edge, so the stride is s = ceil(older / half).
The pattern is relative to the newest token (Sparse Transformer's (i - j) mod s == 0),
so it shifts by one every step. In evict mode it strides over the slots still kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from policies.base import KVPolicy, Selection, register


@register("strided")
@dataclass(frozen=True, kw_only=True)
class Strided(KVPolicy):
    def select(self, n: int, length: int, scores: Tensor | None, device: torch.device) -> Selection | None:
        recent, other = self.split(length)
        if recent + other >= n:
            return None
        older = n - recent
        stride = math.ceil(older / other)
        picks = torch.arange(older - 1, -1, -stride, device=device).flip(0)  # ascending, <= other of them
        return Selection(picks, recent)
