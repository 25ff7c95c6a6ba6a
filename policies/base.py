"""The one interface every KV policy implements, and the name registry.

A policy is a small frozen dataclass that decides, at each decode step, which cached
tokens the new query attends to. It sees candidate slots in age order (oldest first;
the newest token is the last slot) and, if it scores tokens, one score per slot. It
returns slot indices, or None for "all of them". Where the KV lives, how scores are
accumulated and whether unselected KV is freed are the runner's business
(`runner.kv.store`), so each policy stays a few lines of selection logic.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, TypeVar

import torch
from torch import Tensor

_REGISTRY: dict[str, type["KVPolicy"]] = {}
P = TypeVar("P", bound=type["KVPolicy"])


class ScoreMode(enum.Enum):
    """How attention probabilities become a per-token score (for policies that score)."""
    ALL = "all"  # H2O: sum over every query so far
    WINDOW = "window"  # ALISA SWA: sum over the queries of the last `window` steps
    DECAY = "decay"  # ours: exponentially decayed running sum, time constant `window` steps


@dataclass(frozen=True)
class Scoring:
    mode: ScoreMode
    per_head: bool  # one score per kv head (H2O) or one per sequence, reduced over heads (SWA)
    permanent: bool  # a token once dropped never comes back (H2O), even with KV retained


@dataclass(frozen=True)
class Selection:
    """The slots one decode step attends: `picks` among the older slots plus the `recent`
    newest ones. Kept apart because the recent run is contiguous and most picks carry over
    from step to step: storage copies only what is new (`runner.kv.picks`)."""
    picks: Tensor | None  # (k,) shared by all rows, ascending; or (b, g, k) per row, any order; all < n - recent
    recent: int

    def ordered(self) -> "Selection":
        """Per-row picks sorted ascending: what keeps compacted (evicted) storage in age order.
        Attention does not care about order, so the retain path skips this sort (~4 ms a step at
        batch 16, prompt 3072 on the 2-core CPU: a sort per layer)."""
        if self.picks is None or self.picks.dim() == 1:
            return self
        return Selection(self.picks.sort(dim=-1).values, self.recent)

    def index(self, n: int, device: torch.device) -> Tensor:
        """All selected slots, picks first, then the recent run: (m,) or (b, g, m)."""
        tail = torch.arange(n - self.recent, n, device=device)
        if self.picks is None:
            return tail
        if self.picks.dim() == 1:
            return torch.cat((self.picks, tail))
        return torch.cat((self.picks, tail.expand(*self.picks.shape[:2], -1)), dim=-1)


@dataclass(frozen=True, kw_only=True)
class KVPolicy:
    """Base: a budget (ratio or fixed) and `select`. Subclasses add their own knobs.

    Budget: `sparsity` s keeps a caching ratio r = 1 - s of the current length (the ALISA
    paper's setting: the budget grows with the sequence), or `budget_tokens` keeps a fixed
    number (H2O's real-drop setting). With neither, the policy keeps everything.
    """
    sparsity: float | None = None
    budget_tokens: int | None = None
    name: ClassVar[str] = "base"
    scoring: ClassVar[Scoring | None] = None

    def __post_init__(self) -> None:
        if self.sparsity is not None and self.budget_tokens is not None:
            raise ValueError("kv.sparsity and kv.budget_tokens: give one budget, not both")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"kv.sparsity: must be in [0, 1), got {self.sparsity}")
        if self.budget_tokens is not None and self.budget_tokens < 2:
            raise ValueError(f"kv.budget_tokens: must be at least 2, got {self.budget_tokens}")

    def split(self, length: int) -> tuple[int, int]:
        """(recent, other) token counts at this length; the budget is their sum.

        Ratio budgets follow ALISA Alg. 1: k = round(n * r / 2) recent + k others.
        """
        if self.sparsity is not None:
            k = max(1, round(length * (1.0 - self.sparsity) / 2))
            return k, k
        if self.budget_tokens is not None:
            return math.ceil(self.budget_tokens / 2), self.budget_tokens // 2
        return length, 0

    def budget(self, length: int) -> int:
        return min(length, sum(self.split(length)))

    def score_window(self, length: int) -> int:
        """Steps of attention a score sums over (WINDOW) or its decay time constant (DECAY)."""
        return self.split(length)[1] or 1

    def select(self, n: int, length: int, scores: Tensor | None, device: torch.device) -> Selection | None:
        """Slots to attend among n candidates (age order) when `length` tokens have been seen,
        or None for all n. Per-row picks may come in any order (see `Selection.ordered`)."""
        raise NotImplementedError


def recent_plus_top(n: int, recent: int, other: int, scores: Tensor) -> Selection | None:
    """The `recent` newest slots plus the `other` best-scored older ones (picks (b, g, other)).

    Shared by H2O and SWA, which differ only in how `scores` (b, g, n) are accumulated.
    Older picks never overlap the recent window: top-k runs over the older slots only.
    """
    if recent + other >= n:
        return None
    top = scores[..., :n - recent].topk(other, dim=-1, sorted=False).indices  # (b, g, other), any order
    return Selection(top, recent)


def register(name: str) -> Callable[[P], P]:
    def deco(cls: P) -> P:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def get_policy(name: str, **params) -> KVPolicy:
    """Build a registered policy; a parameter it does not take is an error naming `kv.<param>`."""
    if name not in _REGISTRY:
        raise ValueError(f"kv.policy: unknown policy {name!r}; known: {', '.join(policy_names())}")
    cls = _REGISTRY[name]
    known = set(cls.__dataclass_fields__)
    for key in params:
        if key not in known:
            raise ValueError(f"kv.{key}: not a parameter of policy {name!r} "
                             f"(it takes: {', '.join(sorted(known))})")
    return cls(**params)
