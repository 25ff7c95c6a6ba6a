"""What an attention unit (`runner.model.layers.Attention`) needs from its batch's KV.

Declared in the model layer so that the units depend on this interface, not on the KV layer
that implements it (`runner.kv.store.KVStore`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from torch import Tensor

# (h (r, hidden), positions (r,)) -> K, V (r, kv_heads, head_dim): a layer's K/V from its input.
Projector = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@runtime_checkable
class AttentionKV(Protocol):
    """A batch's KV as the attention units use it: prompt attention, one decode step, and (ALISA
    phase III) the layer inputs old K/V can be recomputed from."""

    @property
    def wants_inputs(self) -> bool:
        """Whether `observe_inputs` keeps anything (it is skipped otherwise)."""
        ...

    def observe_inputs(self, layer: int, h: Tensor, positions: Tensor, start: int, project: Projector) -> None:
        """Layer inputs h (b, s, hidden) of slots start.. at rotary `positions` (b, s), and how to project them."""
        ...

    def prefill(self, layer: int, rows: slice, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Attention of the prompt rows `rows` (q (b, nh, s, d), k, v (b, kvh, s, d)); stores their K/V."""
        ...

    def decode(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """One new token per row: store its K/V and attend. -> (b, nh, 1, d)"""
        ...
