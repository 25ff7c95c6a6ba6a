"""`h2o`: recent tokens plus "heavy hitters" by attention summed over every query so far.

As H2O (NeurIPS'23; FMInference/H2O `utils_hh`): scores are per kv head (for GQA, summed
over the query heads of the group), half the budget is recent, half heavy hitters, and
eviction is permanent: a token dropped once never returns, even in retain mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from policies.base import KVPolicy, Selection, ScoreMode, Scoring, recent_plus_top, register


@register("h2o")
@dataclass(frozen=True, kw_only=True)
class H2O(KVPolicy):
    scoring: ClassVar[Scoring] = Scoring(mode=ScoreMode.ALL, per_head=True, permanent=True)

    def select(self, n: int, length: int, scores: Tensor | None, device: torch.device) -> Selection | None:
        assert scores is not None
        return recent_plus_top(n, *self.split(length), scores)
