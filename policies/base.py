"""The one interface every KV policy implements, and the name registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

from torch import Tensor

_REGISTRY: dict[str, type["KVPolicy"]] = {}
P = TypeVar("P", bound=type["KVPolicy"])


@dataclass(frozen=True, kw_only=True)
class KVPolicy:
    """Chooses which cached tokens each decode step attends to.

    `select` gets the number of cached tokens and returns the slot indices to attend
    (b, n_sel) per layer, or None for "all of them" (dense attention, no gather).
    """
    name = "base"

    def select(self, layer: int, length: int) -> Tensor | None:
        raise NotImplementedError


def register(name: str) -> Callable[[P], P]:
    def deco(cls: P) -> P:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def get_policy(name: str, **params) -> KVPolicy:
    if name not in _REGISTRY:
        raise ValueError(f"kv.policy: unknown policy {name!r}; known: {', '.join(policy_names())}")
    return _REGISTRY[name](**params)
