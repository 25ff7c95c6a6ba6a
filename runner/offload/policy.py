"""The job's `offload` section: FlexGen's placement policy (`flexgen/flex_opt.py::Policy`), by its field names.

Percentages place weights, KV cache and activations across the `gpu`, `cpu` and `disk` tiers (the rest of
each pair's 100 goes to disk). The batch shape (`gpu_batch_size`, `num_gpu_batches`) lives in the job's
`batch` section, as FlexGen's CLI takes it, not here.

KV placement (`kv_placement`):
- `sequence` (FlexGen): whole sequences of each GPU batch by `cache_gpu_percent` / `cache_cpu_percent`
  (rest on disk), each layer's KV loaded whole to the gpu for its attention (runner/offload/sequence_kv.py).
- `token` (ALISA): per token by age in three phases with switch lengths `p1`, `p2`, the share of tokens
  on cpu `offload_ratio` and the share recomputed from activations `recompute_ratio`
  (runner/offload/token_kv.py). The cache percents are FlexGen's and must stay at their defaults.

Activations (the hidden states between layers) live on one tier, as in FlexGen: `act_gpu_percent: 100`,
`act_cpu_percent: 100`, or both 0 for disk (runner/offload/activations.py).

`compress_cache` stores FlexGen-placed KV as 4-bit codes in groups of 64 along the head dim (or the
whole head dim when smaller), min/max per group, on every tier; attention reads the dequantized values.

`compress_weight` stores every weight matrix as 4-bit codes in groups of 64 along dim 0 (norms and biases
as they are), in whichever tier is its home, dequantized into the gpu staging slot when its layer runs.

`cpu_cache_compute` (dense attention, uncompressed KV) computes the attention of the sequences whose KV
is on `cpu` there, against their home, instead of loading it to the gpu: only queries and outputs move.

`pick_buffer` (token placement, scoring KV policies such as swa and h2o): each layer keeps its picks packed
on the gpu across steps and fetches only the picks new to it (the default; runner/kv/picks.py). `false`
gathers every pick every step, ALISA Alg. 2's data path: every cpu-resident pick crosses the link each
step (selected and fetched ahead of its layer, while earlier layers compute), but the gpu holds two
layers' gathers (the attending one and the next, fetched ahead) instead of a buffer per layer.

Unknown keys are refused by name rather than silently ignored.
"""
from __future__ import annotations

import dataclasses
import enum

from runner.memory.pools import Tier
from runner.spec import _bad, _Spec

class KVPlacement(str, enum.Enum):
    SEQUENCE = "sequence"  # FlexGen: whole sequences by percent
    TOKEN = "token"  # ALISA: tokens by age, three phases


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadPolicy(_Spec):
    _section = "offload"
    _retired = {"cache_disk_percent": "not a key: the KV's disk share is the rest, 100 - cache_gpu_percent - "
                                      "cache_cpu_percent"}
    w_gpu_percent: float = 100.0
    w_cpu_percent: float = 0.0
    cache_gpu_percent: float = 100.0
    cache_cpu_percent: float = 0.0
    act_gpu_percent: float = 100.0
    act_cpu_percent: float = 0.0
    overlap: bool = True  # prefetch the next layer's weights on copy threads while this one computes
    pin_weight: bool = True  # cpu-tier weights in pinned memory (the cpu pool pins whenever the device is CUDA)
    cpu_cache_compute: bool = False
    compress_weight: bool = False
    compress_cache: bool = False
    kv_placement: KVPlacement = KVPlacement.SEQUENCE
    p1: int | None = None  # token placement: length where phase II (older tokens on cpu) starts
    p2: int | None = None  # token placement: length where phase III (recompute the oldest) starts
    offload_ratio: float = 0.0  # token placement: share of tokens (the oldest) on cpu from p1
    recompute_ratio: float = 0.0  # token placement: share of tokens (the oldest) recomputed from p2
    pick_buffer: bool = True  # token placement: keep each layer's picks on the gpu across steps (see above)

    def _validate(self) -> None:
        values = self.values()
        for kind in ("w", "cache", "act"):
            gpu, cpu = f"{kind}_gpu_percent", f"{kind}_cpu_percent"
            for name in (gpu, cpu):
                value = values[name]
                if not 0 <= value <= 100:
                    raise _bad(f"offload.{name}", f"must be in [0, 100], got {value:g}")
            total = values[gpu] + values[cpu]
            if total > 100 + 1e-9:
                raise _bad(f"offload.{cpu}", f"{gpu} + {cpu} must be <= 100 (the rest goes to disk), got {total:g}")
        self._validate_placement()
        if (self.act_gpu_percent, self.act_cpu_percent) not in ((100.0, 0.0), (0.0, 100.0), (0.0, 0.0)):
            raise _bad("offload.act_gpu_percent", "activations live on one tier, as in FlexGen: act_gpu_percent "
                       "100 (gpu), act_cpu_percent 100 (cpu) or both 0 (disk), got "
                       f"{self.act_gpu_percent:g} / {self.act_cpu_percent:g}")

    def _validate_placement(self) -> None:
        token_fields, values = ("p1", "p2", "offload_ratio", "recompute_ratio"), self.values()
        if not self.pick_buffer and self.kv_placement is not KVPlacement.TOKEN:
            raise _bad("offload.pick_buffer", "only kv_placement: token fetches picks by token")
        if self.cpu_cache_compute and self.kv_placement is KVPlacement.TOKEN:
            raise _bad("offload.cpu_cache_compute", "FlexGen's setting for kv_placement: sequence")
        if self.compress_cache and self.kv_placement is KVPlacement.TOKEN:
            raise _bad("offload.compress_cache", "FlexGen's 4-bit cache is for kv_placement: sequence; "
                       "token placement compresses with kv.bits: 8")
        if self.kv_placement is KVPlacement.SEQUENCE:
            for name in token_fields:
                if values[name] not in (None, 0.0):
                    raise _bad(f"offload.{name}", "only used with offload.kv_placement: token")
            return
        for name in ("cache_gpu_percent", "cache_cpu_percent"):
            if values[name] != OffloadPolicy.__dataclass_fields__[name].default:
                raise _bad(f"offload.{name}", "FlexGen's per-sequence split; kv_placement: token places KV "
                           "by p1, p2, offload_ratio and recompute_ratio instead")
        for name in ("p1", "p2"):
            if values[name] is None or values[name] < 1:
                raise _bad(f"offload.{name}", "kv_placement: token needs a phase switch length >= 1")
        if self.p2 < self.p1:
            raise _bad("offload.p2", f"must be >= p1 ({self.p1}), got {self.p2}")
        if not 0 <= self.offload_ratio < 1:
            raise _bad("offload.offload_ratio", f"must be in [0, 1), got {self.offload_ratio:g}")
        if not 0 <= self.recompute_ratio <= self.offload_ratio:
            raise _bad("offload.recompute_ratio", f"must be in [0, offload_ratio = {self.offload_ratio:g}], "
                       f"got {self.recompute_ratio:g}")

    @property
    def act_tier(self) -> Tier:
        return Tier.GPU if self.act_gpu_percent == 100 else Tier.CPU if self.act_cpu_percent == 100 else Tier.DISK

    @property
    def w_disk_percent(self) -> float:
        return 100.0 - self.w_gpu_percent - self.w_cpu_percent
