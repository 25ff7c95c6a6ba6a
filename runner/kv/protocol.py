"""The interface every KV cache offers `runner.kv.store.KVStore` (and the block executor).

Four classes implement it: the dense `runner.kv.cache.KVCache`, the integer
`runner.kv.quant.QuantizedKVCache`, and the block executor's tiered caches
`runner.offload.sequence_kv.SequenceSplitKV` and `runner.offload.token_kv.TokenTieredKV`.
Every cache stores and reads slots (the abstract methods). What only some caches do (move KV
between tiers ahead of a layer, keep layer inputs to recompute K/V from, attend by tier) is
declared here too, as a flag or a method that does nothing by default, so callers ask the
cache instead of probing its class.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import astuple, dataclass

from torch import Tensor

from runner.model.attention_kv import Projector


@dataclass
class KVTraffic:
    """What a tiered cache moved and recomputed (bytes over the link, tokens, seconds)."""
    up_bytes: int = 0  # gpu <- cpu: selected old tokens fetched
    ahead_bytes: int = 0  # of those, fetched before their layer ran (fetch_ahead)
    down_bytes: int = 0  # cpu <- gpu: tokens leaving the gpu window
    recomputed: int = 0  # (token, layer) K/V pairs recomputed from activations
    recompute_s: float = 0.0
    recompute_saved_bytes: int = 0  # what fetching the recomputed tokens from cpu would have moved

    def __add__(self, other: KVTraffic) -> KVTraffic:
        """Field by field: the traffic of several caches together."""
        return KVTraffic(*(a + b for a, b in zip(astuple(self), astuple(other))))


class KVCacheBase(ABC):
    """Per-layer K/V storage of one batch, addressed by slot (see `runner.kv.cache`)."""

    max_len: int  # slots per sequence

    # -- capabilities: what the store and the executor ask of a cache, neutral by default --
    # Takes a prefill's writes in row groups (`rows` of part of the batch), see runner.engines.lm.
    groupable: bool = False
    # Keeps layer inputs (`observe_inputs`) to recompute old K/V from (ALISA phase III).
    wants_inputs: bool = False
    # `fetch_ahead` wants the next decode step's selection a layer early (the store selects in `prefetch`).
    fetches_ahead: bool = False
    # FlexGen's cpu_cache_compute: decode attention runs by tier in `attend`, dense, not in the store.
    cpu_compute: bool = False
    # Link bytes and recomputation so far; None for a cache that moves nothing between tiers.
    traffic: KVTraffic | None = None

    # -- every cache -----------------------------------------------------------------------
    @abstractmethod
    def write(self, layer: int, k: Tensor, v: Tensor, start: int) -> None:
        """k, v: (b, kvh, s, d) for slots start..start+s."""

    @abstractmethod
    def read(self, layer: int, end: int, start: int = 0) -> tuple[Tensor, Tensor]:
        """Slots start..end: (b, kvh, end - start, d) each."""

    @abstractmethod
    def gather(self, layer: int, index: Tensor) -> tuple[Tensor, Tensor]:
        """The selected slots packed dense: (b, kvh, m, d); index (m,) or (b, g, m), see `flat_rows`."""

    @abstractmethod
    def take_rows(self, layer: int, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Slots by flat row number into a (b * kvh * max_len, d) view: (r, d) each."""

    @abstractmethod
    def rows(self, rows: slice) -> KVCacheBase:
        """The cache of some batch rows, sharing this one's storage (writes land here)."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the cache holds."""

    @abstractmethod
    def bytes_per_token(self) -> int:
        """Stored bytes of one token's K and V over all layers (per sequence)."""

    # -- storage modes only some caches support (the job checks refuse the others) ----------
    def compact(self, layer: int, index: Tensor) -> None:
        """Keep only the selected slots (kv.mode: evict): afterwards slots 0..m-1 hold them, on every
        tier a tiered cache keeps them in."""
        raise NotImplementedError(f"{type(self).__name__} cannot compact slots (kv.mode: evict)")

    def select_rows(self, index: Tensor) -> KVCacheBase:
        """A new cache holding rows `index` (b',) of this one, copied (rows may repeat: forking)."""
        raise NotImplementedError(f"{type(self).__name__} cannot copy out batch rows")

    def attend(self, layer: int, q: Tensor, n: int, bias: Tensor | None) -> Tensor:
        """Dense decode attention over positions 0..n, where `cpu_compute` is set."""
        raise NotImplementedError(f"{type(self).__name__} does not attend by tier (cpu_compute)")

    # -- tier movement: nothing to do for a cache on one device --------------------------------
    def observe_inputs(self, layer: int, h: Tensor, positions: Tensor, start: int, project: Projector) -> None:
        """Layer inputs h (b, s, hidden) of slots start.. at rotary `positions` (b, s), and how to
        project them to K/V; kept only where `wants_inputs`."""

    def prefetch(self, layer: int, n: int) -> None:
        """Start bringing positions 0..n of `layer` to the gpu before the layer runs."""

    def fetch_ahead(self, layer: int, n: int, start: int, picks: Tensor | None = None) -> None:
        """Start fetching what the step reaching length n reads (the run start..n-1 and `picks`),
        where `fetches_ahead`; kept until `drop_ahead`."""

    def drop_ahead(self, layer: int) -> None:
        """Release what `fetch_ahead` fetched for `layer` (the step's reads are done)."""

    def flush(self, layer: int, start: int, end: int) -> None:
        """Write slots start..end of `layer` back to their homes after its attention: the step's new token
        (its position; in evict mode its slot, or none once `compact` has moved the slots on every tier)."""

    def free(self) -> None:
        """Return every allocation to its pool; a cache of plain tensors holds none."""
