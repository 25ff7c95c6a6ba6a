"""`swa`: ALISA's Sparse Window Attention (ISCA'24, Alg. 1).

At length n with caching ratio r: k = round(n * r / 2) most recent tokens ("locally
static") plus the k older tokens with the highest local attention sum ("globally
dynamic"): attention weights of the last `window` decode steps (default k, as Alg. 1),
summed over those steps and over all heads, so one selection serves the whole layer of
one sequence. Global picks never overlap the local window. `score: decay` replaces the
window by an exponentially decayed running sum with time constant `window` (ours);
`per_head: true` selects per kv head instead (an ablation, to compare with H2O like for like).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from policies.base import KVPolicy, Selection, ScoreMode, Scoring, recent_plus_top, register


@register("swa")
@dataclass(frozen=True, kw_only=True)
class SWA(KVPolicy):
    window: int | None = None  # scoring window in decode steps; None = k, as the paper
    score: ScoreMode = ScoreMode.WINDOW
    per_head: bool = False  # ablation (not the paper): one selection per kv head, as H2O

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "score", ScoreMode(self.score))
        if self.score is ScoreMode.ALL:
            raise ValueError("kv.score: swa scores by window or decay; 'all' is h2o's rule")
        if self.window is not None and self.window < 1:
            raise ValueError(f"kv.window: must be at least 1, got {self.window}")

    @property
    def scoring(self) -> Scoring:  # type: ignore[override]
        return Scoring(mode=self.score, per_head=self.per_head, permanent=False)

    def score_window(self, length: int) -> int:
        return self.window or super().score_window(length)

    def select(self, n: int, length: int, scores: Tensor | None, device: torch.device) -> Selection | None:
        assert scores is not None
        return recent_plus_top(n, *self.split(length), scores)
