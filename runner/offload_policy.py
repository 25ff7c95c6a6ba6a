"""The job's `offload` section: FlexGen's placement policy (`flexgen/flex_opt.py::Policy`), by its field names.

Percentages place weights, KV cache and activations across the `gpu`, `cpu` and `disk` tiers (the rest of
each pair's 100 goes to disk). The batch shape (`gpu_batch_size`, `num_gpu_batches`) lives in the job's
`batch` section, as FlexGen's CLI takes it, not here.

This increment implements the weight split and `overlap`; every other setting that would change where KV
or activations live, or compress anything, is refused by name rather than silently ignored.
"""
from __future__ import annotations

import dataclasses

from runner.spec import _bad, _Spec

# Fields whose non-default values the executor cannot honour yet: (field, required value, why).
_NOT_YET: tuple[tuple[str, object, str], ...] = (
    ("cache_gpu_percent", 100.0, "KV stays on the gpu pool"),
    ("cache_cpu_percent", 0.0, "KV stays on the gpu pool"),
    ("act_gpu_percent", 100.0, "activations stay on the gpu pool"),
    ("act_cpu_percent", 0.0, "activations stay on the gpu pool"),
    ("cpu_cache_compute", False, "attention always runs on the gpu pool"),
    ("compress_weight", False, "weights are stored uncompressed"),
    ("compress_cache", False, "KV compression is kv.bits, not offload"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadPolicy(_Spec):
    _section = "offload"
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

    def _validate(self) -> None:
        for kind in ("w", "cache", "act"):
            gpu, cpu = f"{kind}_gpu_percent", f"{kind}_cpu_percent"
            for name in (gpu, cpu):
                value = getattr(self, name)
                if not 0 <= value <= 100:
                    raise _bad(f"offload.{name}", f"must be in [0, 100], got {value:g}")
            total = getattr(self, gpu) + getattr(self, cpu)
            if total > 100 + 1e-9:
                raise _bad(f"offload.{cpu}", f"{gpu} + {cpu} must be <= 100 (the rest goes to disk), got {total:g}")
        for name, required, why in _NOT_YET:
            if getattr(self, name) != required:
                raise _bad(f"offload.{name}", f"not implemented yet ({why}); must be {_show(required)}, "
                           f"got {_show(getattr(self, name))}")

    @property
    def w_disk_percent(self) -> float:
        return 100.0 - self.w_gpu_percent - self.w_cpu_percent


def _show(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)
